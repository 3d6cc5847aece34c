"""Convert between our megatron checkpoints and Hugging Face directories (single process).

    python -m megatron_vlm.cli.convert_checkpoint export --checkpoint runs/tiny/stage1 --out hf/stage1 \
        [--llm-out hf/stage1-llm | --llm-only] [--dtype bf16|fp32] [--max-shard-gb 5]
    python -m megatron_vlm.cli.convert_checkpoint import --hf hf/stage1 --recipe recipes/tiny/stage0.yaml \
        --out runs/imported          # then: checkpoint.init_from=runs/imported
    python -m megatron_vlm.cli.convert_checkpoint verify --checkpoint runs/tiny/stage1 --hf hf/stage1

``export`` streams the checkpoint (a root with ``latest``, or one ``step_*`` directory, saved at
any TP/PP layout) tensor by tensor into sharded safetensors: no model is built, memory holds one
mapping rule's tensors. The model config and tokenizer come from the checkpoint's own
``description.json``; ``--recipe`` (with trailing ``section.key=value`` overrides) replaces it,
and is needed for checkpoints written before descriptions existed. By default it writes the whole
VLM as ``transformers``' ``nemotron_h_omni`` (``AutoModelForImageTextToText``); ``--llm-only``
the language model alone as ``NemotronHForCausalLM``, ``--llm-out`` that as a second directory.
Each directory gets the safetensors (+ index when sharded), ``config.json``,
``generation_config.json`` and the tokenizer files. ``--dtype`` casts floating-point tensors
(default: as saved).

``import`` reads an HF directory (our exports, the released Nemotron Nano V2 VL names, the
released NemotronH LLM alone, a RADIO tower alone), checks every tensor's name and shape against
the recipe's model before loading anything, and writes a checkpoint at step 0 (``latest``,
``meta.json``, ``description.json``) tensor by tensor: the model is built on the meta device and
each tensor is mapped from the safetensors when the writer reaches it (``stream_import``), so
memory holds a few tensors, not the model. Parts the directories lack keep the recipe's fresh
initialisation.

``verify`` runs our model (from the checkpoint) and the HF model (from the directory) on the
same random tokens and tiles, prints the max |logit difference| and exits 1 above ``--tol``.

Bad input (missing paths, unreadable configs, unmapped tensors, shapes unlike the recipe's)
gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_vlm.known_warnings import ignore_known_noise

ignore_known_noise()  # before megatron-core is imported: it warns at import time


class ConvertError(Exception):
    pass


def _resolve_checkpoint(path: str) -> Path:
    from megatron_vlm.training.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except CheckpointError as e:
        raise ConvertError(f"--checkpoint {e}") from None


def _describe(source: Path, recipe_path, overrides: list) -> dict:
    """{"vlm_cfg", "ids", "tokenizer_dir", "tile_size"} from --recipe or the checkpoint."""
    from megatron_vlm.data.tokenizer import token_ids
    from megatron_vlm.training import checkpoint_meta

    if recipe_path:
        from megatron_vlm.models.vlm import load_vlm_config
        from megatron_vlm.training.data_setup import load_tokenizer
        from megatron_vlm.training.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides)
        tokenizer = load_tokenizer(recipe)
        return {"vlm_cfg": load_vlm_config(recipe.model.config), "ids": token_ids(tokenizer),
                "tokenizer_dir": Path(recipe.data.tokenizer), "tile_size": recipe.data.tile_size,
                "tokenizer": tokenizer}
    description = checkpoint_meta.read(source)
    if description is None:
        raise ConvertError(f"{source} has no {checkpoint_meta.FILE} (written before checkpoints "
                           "described themselves): pass --recipe")
    if overrides:
        raise ConvertError("recipe overrides need --recipe")
    tok = description["tokenizer"]
    tokenizer = None
    if Path(tok["path"]).exists():
        from megatron_vlm.data.tokenizer import VLMTokenizer

        tokenizer = VLMTokenizer.from_pretrained(tok["path"])
    return {"vlm_cfg": description["model_config"], "ids": tok,
            "tokenizer_dir": Path(tok["path"]) if tokenizer is not None else None,
            "tile_size": description["recipe"]["data"]["tile_size"], "tokenizer": tokenizer}


def export(args) -> dict:
    from megatron_vlm.conversion import hf
    from megatron_vlm.conversion.dist_reader import DistCheckpointReader

    if args.llm_only and args.llm_out:
        raise ConvertError("--llm-only and --llm-out exclude each other")
    source = _resolve_checkpoint(args.checkpoint)
    info = _describe(source, args.recipe, args.overrides)
    if info["tokenizer_dir"] is None:
        print(f"note: the tokenizer of {source} is not at its saved path; the export has no "
              "tokenizer files", file=sys.stderr)
    reader = DistCheckpointReader(source)
    dtype = hf.DTYPES[args.dtype] if args.dtype else None
    max_bytes = int(args.max_shard_gb * 1024 ** 3)
    llm_dir = Path(args.out) if args.llm_only else (Path(args.llm_out) if args.llm_out else None)
    jobs = [] if args.llm_only else [("vlm", Path(args.out))]
    if llm_dir is not None:
        jobs.append(("llm", llm_dir))
    written = {}
    for kind, out in jobs:
        written[str(out)] = hf.export_hf(
            reader.read, reader.shapes(), info["vlm_cfg"], kind, out, info["ids"],
            info["tokenizer_dir"], dtype, max_bytes, progress=not args.quiet,
            tokenizer=info["tokenizer"])
        print(f"exported {source} -> {out}: {', '.join(written[str(out)])}")
    return written


def _check_hf_config(hf_dir: Path, vlm_cfg: dict) -> None:
    """Fail early, with names, when the HF directory describes another LLM than the recipe."""
    from megatron_vlm.conversion.hf_mapping_llm import hf_config_kwargs

    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        return
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as e:
        raise ConvertError(f"{config_file}: not valid JSON ({e})") from None
    if raw.get("model_type") == "radio":  # a vision tower alone
        vision = vlm_cfg["vision_model"]
        expected = {"hidden_size": vision["hidden_size"], "num_hidden_layers": vision["num_layers"],
                    "num_attention_heads": vision["num_attention_heads"]}
        diffs = [f"{k}: HF {raw[k]!r} vs recipe {v!r}" for k, v in expected.items()
                 if k in raw and raw[k] != v]
        if diffs:
            raise ConvertError(f"{hf_dir} does not match the recipe's vision tower: "
                               + "; ".join(diffs))
        return
    text = raw.get("text_config") or raw.get("llm_config") or raw
    expected = hf_config_kwargs(vlm_cfg["language_model"])
    diffs = [f"{k}: HF {text[k]!r} vs recipe {expected[k]!r}"
             for k in ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads", "mamba_num_heads", "mamba_head_dim",
                       "ssm_state_size", "n_groups", "hybrid_override_pattern")
             if k in text and text[k] != expected[k]]
    if diffs:
        raise ConvertError(f"{hf_dir} does not match the recipe's model: " + "; ".join(diffs))


def _single_process():
    from megatron_vlm.distributed import initialize_distributed

    initialize_distributed(tp=1, pp=1, cp=1, single_process=True)


def import_(args) -> Path:
    from megatron_vlm.conversion import hf, stream_import
    from megatron_vlm.models.vlm import load_vlm_config
    from megatron_vlm.training import checkpoint_meta
    from megatron_vlm.training.checkpoint import mark_finished, save_checkpoint
    from megatron_vlm.training.data_setup import load_tokenizer
    from megatron_vlm.training.model_setup import PRECISION_DTYPES
    from megatron_vlm.training.recipe import load_recipe

    hf_dirs = [Path(d) for d in args.hf]
    for hf_dir in hf_dirs:
        if not hf_dir.is_dir():
            raise ConvertError(f"--hf {hf_dir}: no such directory")
    recipe = load_recipe(args.recipe, args.overrides)
    vlm_cfg = load_vlm_config(recipe.model.config)
    for hf_dir in hf_dirs:
        _check_hf_config(hf_dir, vlm_cfg)
    tokenizer = load_tokenizer(recipe)
    if tokenizer.vocab_size > vlm_cfg["language_model"]["vocab_size"]:
        raise ConvertError(f"{recipe.source}: data.tokenizer has {tokenizer.vocab_size} tokens but "
                           f"the model's vocab_size is {vlm_cfg['language_model']['vocab_size']}")
    _single_process()
    # The model's structure on the meta device; the tensors come from the HF files while the
    # checkpoint is written (stream_import): the model is never held in memory.
    dtype = PRECISION_DTYPES[recipe.train.precision]
    model = stream_import.build_meta_model(vlm_cfg, tokenizer.image_id, tokenizer.img_end_id, dtype)
    shapes = {k: (v.shape, v.dtype) for k, v in hf.full_state(model).items()}
    sources = stream_import.HFSources(hf_dirs, vlm_cfg, shapes)  # names + shapes checked here
    fresh = stream_import.fresh_parts(shapes, sources.filled())
    stream_import.materialise_parts(model, vlm_cfg, fresh, dtype)
    for hf_dir, layout in zip(hf_dirs, sources.layouts):
        print(f"importing {hf_dir} ({layout} layout)")
    checkpoint_meta.register(recipe, vlm_cfg, tokenizer)
    names = [str(d.resolve()) for d in hf_dirs]
    strategy = stream_import.streaming_save_strategy(model, sources, progress=not args.quiet)
    path = save_checkpoint(args.out, 0, [model], sharded_strategy=strategy,
                           meta={"recipe": recipe.name, "layout": "tp=1 pp=1",
                                 "imported_from": names, "hf_layout": sources.layouts})
    # A finished "stage" as far as checkpoint.init_from is concerned.
    mark_finished(args.out, {"stage": "imported", "steps": 0, "imported_from": names})
    if fresh:
        print(f"note: the {', '.join(fresh)} keep(s) the recipe's fresh initialisation")
    print(f"saved {path}")
    return path


def verify(args) -> float:
    from megatron_vlm.conversion import verify as check
    from megatron_vlm.conversion.hf import unwrap
    from megatron_vlm.training.checkpoint import load_checkpoint

    source = _resolve_checkpoint(args.checkpoint)
    info = _describe(source, args.recipe, args.overrides)
    hf_model = check.load_hf(Path(args.hf))
    _single_process()
    from megatron_vlm.models.vlm import build_vlm
    from megatron_vlm.platform import cpu_mode

    model = build_vlm(info["vlm_cfg"], image_token_id=info["ids"]["image_id"],
                      params_dtype="float32", use_cpu_initialization=cpu_mode())
    load_checkpoint(source, [model])
    ids = dict(info["ids"])
    if info["tokenizer"] is not None:
        ids.update(img_start_id=info["tokenizer"].img_start_id, img_end_id=info["tokenizer"].img_end_id)
    diffs = check.compare(unwrap(model), hf_model, info["vlm_cfg"], ids, info["tile_size"],
                          seq=args.seq, seed=args.seed)
    parts = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items() if k not in ("max",))
    print(f"verify {source} vs {args.hf}: max |logit diff| {diffs['max']:.3g} ({parts}); "
          f"tolerance {args.tol:g}")
    return diffs["max"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_vlm.cli.convert_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="megatron checkpoint -> Hugging Face directory")
    ex.add_argument("--checkpoint", required=True, help="checkpoint root (with latest) or step dir")
    ex.add_argument("--recipe", help="override the checkpoint's own description")
    ex.add_argument("--out", required=True)
    ex.add_argument("--llm-out", help="also write the LLM alone (NemotronHForCausalLM) here")
    ex.add_argument("--llm-only", action="store_true", help="write only the LLM to --out")
    ex.add_argument("--dtype", choices=("bf16", "fp32"), help="cast weights (default: as saved)")
    ex.add_argument("--max-shard-gb", type=float, default=5.0)
    im = sub.add_parser("import", help="Hugging Face directory -> megatron checkpoint")
    im.add_argument("--hf", required=True, action="append",
                    help="HF directory; repeat to fill parts from several (LLM, RADIO)")
    im.add_argument("--recipe", required=True)
    im.add_argument("--out", required=True, help="checkpoint root to write (step 0)")
    ve = sub.add_parser("verify", help="our checkpoint vs its HF export on random inputs")
    ve.add_argument("--checkpoint", required=True)
    ve.add_argument("--hf", required=True)
    ve.add_argument("--recipe", help="override the checkpoint's own description")
    ve.add_argument("--tol", type=float, default=1e-5, help="max |logit diff| accepted (fp32)")
    ve.add_argument("--seq", type=int, default=64)
    ve.add_argument("--seed", type=int, default=0)
    for p in (ex, im, ve):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_vlm.training.recipe import RecipeError

    try:
        if args.command == "export":
            export(args)
        elif args.command == "import":
            import_(args)
        else:
            if verify(args) > args.tol:
                print("error: the exported model's logits differ from ours above the tolerance",
                      file=sys.stderr)
                return 1
    except (ConvertError, RecipeError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_vlm.distributed import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
