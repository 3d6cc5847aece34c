"""Peak memory of ``convert_checkpoint export`` and ``import`` for the tiny VLM and one ~10x
its size.

For each size a random-weight checkpoint is saved (megatron dist_checkpointing, as training does),
then exported to a sharded ``nemotron_h_omni`` directory in a fresh process whose peak RSS is
read from ``getrusage``. Three processes per size:

* ``baseline``: imports torch, megatron-core and transformers and does nothing (the floor);
* ``stream``: ``convert_checkpoint export`` (tensor-by-tensor: no model is built);
* ``materialise``: all weights read into one dict first, then written (what a converter that
  builds / loads the whole model does, at least).

Import reads the streamed export back (``convert_checkpoint import --hf``) in two more processes:

* ``import``: ``convert_checkpoint import`` (meta-device model, tensors mapped while the
  checkpoint is written);
* ``import materialise``: the model built with real weights, the HF tensors copied in, then saved
  (what the converter did before it streamed).

"above baseline" is the conversion's own memory; streaming should grow with the largest tensor,
not with the model.

    python -m bench.bench_convert --out results.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import emit

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": {},
    "x10": dict(hidden_size=640, ffn_hidden_size=2560, num_attention_heads=10, num_query_groups=2,
                kv_channels=64, mamba_num_heads=20, mamba_head_dim=64),
}


def _vlm_cfg(size: str) -> dict:
    from megatron_vlm.models.config import load_model_config
    from megatron_vlm.models.vlm import load_vlm_config

    cfg = load_vlm_config(str(REPO / "recipes/models/vlm_tiny.yaml"))
    cfg["language_model"] = load_model_config(dict(cfg["language_model"], **SIZES[size]))
    return cfg


def _make_checkpoint(size: str, root: Path) -> None:
    import torch

    from megatron_vlm.distributed import destroy_distributed, initialize_distributed
    from megatron_vlm.models.vlm import build_vlm
    from megatron_vlm.training.checkpoint import save_checkpoint

    initialize_distributed(tp=1, pp=1, single_process=True)
    cfg = _vlm_cfg(size)
    model = build_vlm(cfg, image_token_id=7, use_cpu_initialization=True)
    path = save_checkpoint(root, 0, [model], meta={"recipe": f"bench-{size}"})
    params = sum(p.numel() for p in model.parameters())
    _write_import_recipe(cfg, root)
    description = {"format": 1, "recipe": {"data": {"tile_size": 64}}, "model_config": cfg,
                   "tokenizer": {"vocab_size": 4096, "eos_id": 2, "pad_id": 0, "bos_id": None,
                                 "image_id": 7, "path": str(root / "no-tokenizer")}}
    (path / "description.json").write_text(json.dumps(description))
    (root / "params.txt").write_text(str(params))
    destroy_distributed()
    del torch


def _write_import_recipe(cfg: dict, root: Path) -> None:
    """A recipe for ``import``: this size's model config and a small real tokenizer."""
    import yaml

    from megatron_vlm.data_prep.train_tokenizer import train_bpe

    train_bpe(["a converter reads a model back tensor by tensor"] * 50,
              vocab_size=300).save(root / "tokenizer")
    (root / "model.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg))))
    recipe = {"name": "bench-import", "model": {"config": str(root / "model.yaml")},
              "data": {"blend": [{"path": "unused"}], "tokenizer": str(root / "tokenizer"),
                       "seq_length": 64, "tile_size": 64},
              "train": {"steps": 1, "global_batch_size": 1}, "optimizer": {"lr": 1e-4},
              "checkpoint": {"dir": "unused"}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def _import_materialise(hf_dir: str, recipe_file: str, out: str) -> None:
    """The non-streaming import: a real model, filled, then saved."""
    from megatron_vlm.conversion import hf
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training.checkpoint import save_checkpoint
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    initialize_distributed(tp=1, pp=1, single_process=True)
    chunks, _, model_cfg = build_model_chunks(recipe)
    hf.import_into(hf.unwrap(chunks[0]), Path(hf_dir), model_cfg["vlm"])
    save_checkpoint(out, 0, chunks)


def _child(mode: str, checkpoint: str, out: str) -> None:
    import torch  # noqa: F401
    import megatron.core  # noqa: F401
    import transformers  # noqa: F401

    t0 = time.perf_counter()
    if mode == "stream":
        from megatron_vlm.cli.convert_checkpoint import main

        main(["export", "--checkpoint", checkpoint, "--out", out, "--max-shard-gb", "0.02",
              "--quiet"])
    elif mode == "materialise":
        from megatron_vlm.conversion import hf
        from megatron_vlm.conversion.dist_reader import DistCheckpointReader
        from megatron_vlm.training import checkpoint_meta
        from megatron_vlm.training.checkpoint import latest_checkpoint

        step = latest_checkpoint(checkpoint)
        reader = DistCheckpointReader(step)
        state = {k: reader.read(k) for k in reader.keys()}
        desc = checkpoint_meta.read(step)
        hf.export_hf(state.__getitem__, {k: (v.shape, v.dtype) for k, v in state.items()},
                     desc["model_config"], "vlm", Path(out), desc["tokenizer"],
                     max_shard_bytes=int(0.02 * 1024 ** 3))
    elif mode == "import":  # checkpoint: the root holding recipe.yaml and the streamed export
        from megatron_vlm.cli.convert_checkpoint import main

        root = Path(checkpoint)
        main(["import", "--hf", str(root.parent / f"hf_{root.name}_stream"), "--recipe",
              str(root / "recipe.yaml"), "--out", out, "--quiet"])
    elif mode == "import_materialise":
        root = Path(checkpoint)
        _import_materialise(str(root.parent / f"hf_{root.name}_stream"), str(root / "recipe.yaml"),
                            out)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"peak_mib": rss, "seconds": seconds}))


def _measure(mode: str, checkpoint: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "bench.bench_convert", "--child", mode,
                           str(checkpoint), str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CHECKPOINT", "OUT"))
    ap.add_argument("--make-checkpoint", nargs=2, metavar=("SIZE", "ROOT"))
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    if args.make_checkpoint:
        _make_checkpoint(args.make_checkpoint[0], Path(args.make_checkpoint[1]))
        return 0
    rows = []
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            root = Path(tmp) / size
            subprocess.run([sys.executable, "-m", "bench.bench_convert", "--make-checkpoint", size,
                            str(root)], cwd=REPO, env=env, check=True, capture_output=True)
            params = int((root / "params.txt").read_text())
            r = {m: _measure(m, root, Path(tmp) / f"hf_{size}_{m}")
                 for m in ("baseline", "stream", "materialise", "import", "import_materialise")}
            shards = len(list((Path(tmp) / f"hf_{size}_stream").glob("*.safetensors")))
            rows.append((size, params, shards, r))
            print(size, params, r, flush=True)
    base = {size: r["baseline"]["peak_mib"] for size, _, _, r in rows}
    lines = ["## HF export and import: peak memory (bench_convert.py)", "",
             "Peak RSS of one `convert_checkpoint export` process (fp32 weights, 20 MiB shards), "
             "minus a process that only imports the same libraries.", "",
             "| model | params | fp32 MiB | shards | stream: above baseline MiB | stream s "
             "| materialise: above baseline MiB |",
             "|---|---|---|---|---|---|---|"]
    for size, params, shards, r in rows:
        lines.append(f"| {size} | {params / 1e6:.1f}M | {params * 4 / 2 ** 20:.0f} | {shards} "
                     f"| {r['stream']['peak_mib'] - base[size]:.0f} | {r['stream']['seconds']:.1f} "
                     f"| {r['materialise']['peak_mib'] - base[size]:.0f} |")
    (tiny, p1, _, r1), (big, p2, _, r2) = rows[0], rows[-1]

    def growth(mode):
        return (r2[mode]["peak_mib"] - base[big]) / max(1.0, r1[mode]["peak_mib"] - base[tiny])

    lines += ["", f"{big} has {p2 / p1:.1f}x the parameters of {tiny}; the streaming export's own "
              f"memory grows {growth('stream'):.1f}x.", "",
              "`convert_checkpoint import` of that export (HF directory -> megatron checkpoint, "
              "same process measure):", "",
              "| model | import: above baseline MiB | import s | materialise: above baseline MiB |",
              "|---|---|---|---|"]
    for size, params, _, r in rows:
        lines.append(f"| {size} | {r['import']['peak_mib'] - base[size]:.0f} "
                     f"| {r['import']['seconds']:.1f} "
                     f"| {r['import_materialise']['peak_mib'] - base[size]:.0f} |")
    lines += ["", f"The streaming import's own memory grows {growth('import'):.1f}x from {tiny} to "
              f"{big} (building the model and filling it: {growth('import_materialise'):.1f}x)."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
