"""Convert between our megatron checkpoints and Hugging Face directories (single process).

    python -m tools.convert_checkpoint export --recipe recipes/tiny/stage1.yaml \
        --checkpoint runs/tiny/stage1 --out hf/stage1 [--llm-out hf/stage1-llm | --llm-only]
    python -m tools.convert_checkpoint import --hf hf/stage1 --recipe recipes/tiny/stage0.yaml \
        --out runs/imported          # then: checkpoint.init_from=runs/imported

``export`` builds the recipe's model at TP=1/PP=1 (dist_checkpointing reshards whatever layout the
checkpoint was trained at), loads ``--checkpoint`` (a checkpoint root with ``latest``, or one
``step_*`` directory) and writes, by default, the whole VLM as ``transformers``' ``nemotron_h_omni``
(``AutoModelForImageTextToText`` / ``NemotronH_Omni_Reasoning_V3``); ``--llm-only`` writes the
language model alone as ``NemotronHForCausalLM``, ``--llm-out`` writes that as a second directory.
Each directory gets ``model.safetensors`` (sharded past ``--max-shard-gb``), ``config.json`` and the
recipe's tokenizer files. See ``megatron_vlm/conversion/hf.py`` for the layouts and what
transformers computes differently.

``import`` reads such a directory (or an LLM-only one, or the released Nano V2 VL names), maps it
onto the recipe's model and saves a dist_checkpointing checkpoint at step 0 (``latest`` and
``meta.json`` included). An LLM-only import keeps the recipe's freshly initialised vision tower and
connector. Trailing ``section.key=value`` arguments override the recipe, as for training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _setup(recipe_path: str, overrides: list):
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    initialize_distributed(tp=1, pp=1, cp=1, single_process=True)
    from megatron_vlm.training.model_setup import build_model_chunks

    chunks, tokenizer, model_cfg = build_model_chunks(recipe)
    return recipe, chunks, tokenizer, model_cfg["vlm"]


def _resolve_checkpoint(path: str) -> Path:
    from megatron_vlm.training.checkpoint import latest_checkpoint

    root = Path(path)
    if (root / "meta.json").is_file():
        return root
    found = latest_checkpoint(root)
    if found is None:
        raise SystemExit(f"error: --checkpoint {path}: no complete checkpoint (no latest/meta.json)")
    return found


def export(args) -> dict:
    from megatron_vlm.conversion import hf
    from megatron_vlm.training.checkpoint import load_checkpoint

    if args.llm_only and args.llm_out:
        raise SystemExit("error: --llm-only and --llm-out exclude each other")
    recipe, chunks, tokenizer, vlm_cfg = _setup(args.recipe, args.overrides)
    source = _resolve_checkpoint(args.checkpoint)
    load_checkpoint(source, chunks)
    state = hf.full_state(chunks[0])
    max_bytes = int(args.max_shard_gb * 1024 ** 3)
    tok_dir = Path(recipe.data.tokenizer)
    if vlm_cfg["language_model"]["mamba_dt_clamp_min"] is None:
        print("note: transformers clamps the Mamba step size at time_step_min=0.001; this model "
              "does not clamp (set mamba_dt_clamp_min to train with the HF behaviour)")
    written = {}
    llm_dir = Path(args.out) if args.llm_only else (Path(args.llm_out) if args.llm_out else None)
    if not args.llm_only:
        written[args.out] = hf.save_hf_dir(
            Path(args.out), hf.ours_to_hf_vlm(state, vlm_cfg),
            hf.vlm_hf_config(vlm_cfg, tokenizer.image_id, tokenizer), tok_dir, max_bytes)
    if llm_dir is not None:
        written[str(llm_dir)] = hf.save_hf_dir(
            llm_dir, hf.ours_to_hf_llm(state, vlm_cfg), hf.llm_hf_config(vlm_cfg, tokenizer),
            tok_dir, max_bytes)
    for out, files in written.items():
        print(f"exported {source} -> {out}: {', '.join(files)}")
    return written


def _check_hf_config(hf_dir: Path, vlm_cfg: dict) -> None:
    """Fail early, with names, when the HF directory describes another LLM than the recipe."""
    from megatron_vlm.models.hf_mapping_llm import hf_config_kwargs

    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        return
    raw = json.loads(config_file.read_text())
    text = raw.get("text_config") or raw.get("llm_config") or raw
    expected = hf_config_kwargs(vlm_cfg["language_model"])
    diffs = [f"{k}: HF {text[k]!r} vs recipe {expected[k]!r}"
             for k in ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads",
                       "mamba_num_heads", "ssm_state_size", "n_groups")
             if k in text and text[k] != expected[k]]
    if diffs:
        raise SystemExit(f"error: {hf_dir} does not match the recipe's model: " + "; ".join(diffs))


def import_(args) -> Path:
    from megatron_vlm.conversion import hf
    from megatron_vlm.models.hf_mapping_vision import load_full_state
    from megatron_vlm.training.checkpoint import mark_finished, save_checkpoint

    recipe, chunks, tokenizer, vlm_cfg = _setup(args.recipe, args.overrides)
    hf_dir = Path(args.hf)
    _check_hf_config(hf_dir, vlm_cfg)
    ours, layout = hf.hf_to_ours(hf.read_safetensors(hf_dir), vlm_cfg)
    model = hf.unwrap(chunks[0])
    params_dtype = next(model.parameters()).dtype
    ours = {k: v.to(params_dtype) for k, v in ours.items()}
    if layout == "llm":
        load_full_state(model.language_model, hf._split(ours, "language_model."))
        print(f"note: {hf_dir} holds the language model only; vision tower and connector keep "
              "the recipe's fresh initialisation")
    else:
        load_full_state(model, ours)
    path = save_checkpoint(args.out, 0, chunks,
                           meta={"recipe": recipe.name, "layout": "tp=1 pp=1",
                                 "imported_from": str(hf_dir.resolve()), "hf_layout": layout})
    # A finished "stage" as far as checkpoint.init_from is concerned.
    mark_finished(args.out, {"stage": "imported", "steps": 0, "imported_from": str(hf_dir)})
    print(f"imported {hf_dir} ({layout} layout) -> {path}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="megatron checkpoint -> Hugging Face directory")
    ex.add_argument("--recipe", required=True)
    ex.add_argument("--checkpoint", required=True, help="checkpoint root (with latest) or step dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--llm-out", help="also write the LLM alone (NemotronHForCausalLM) here")
    ex.add_argument("--llm-only", action="store_true", help="write only the LLM to --out")
    ex.add_argument("--max-shard-gb", type=float, default=5.0)
    ex.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    im = sub.add_parser("import", help="Hugging Face directory -> megatron checkpoint")
    im.add_argument("--hf", required=True)
    im.add_argument("--recipe", required=True)
    im.add_argument("--out", required=True, help="checkpoint root to write (step 0)")
    im.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            export(args)
        else:
            import_(args)
    finally:
        from megatron_vlm.distributed import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
