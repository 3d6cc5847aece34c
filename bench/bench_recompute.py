"""Activation memory saved by recompute: one training step of the tiny VLM, 4K tokens.

Activation memory = bytes of the tensors autograd keeps for the backward pass (every saved tensor
seen by ``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters excluded). With
recompute, a checkpointed region saves only its inputs; its internals are rebuilt in the backward
pass. Also the step time (forward + backward) and the loss, which must not change.

    python -m bench.bench_recompute --out results.md [--seq 4096] [--tiles 4]
"""

import argparse
import time
from pathlib import Path

import torch

MODES = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full (uniform, 1 layer)": {"recompute_granularity": "full", "recompute_method": "uniform",
                                "recompute_num_layers": 1},
}


def _step(overrides: dict, state, tokens, labels, tiles, image_id):
    from megatron_vlm.models.vlm import build_vlm

    model = build_vlm("vlm_tiny", impl="local", image_token_id=image_id,
                      use_cpu_initialization=True, **overrides)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tiles=tiles, labels=labels).mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    return model.state_dict(), loss.item(), sum(saved.values()) / 2 ** 20, seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--tiles", type=int, default=4)
    args = ap.parse_args()
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.models.vlm import load_vlm_config

    initialize_distributed(single_process=True)
    cfg = load_vlm_config("vlm_tiny")
    image_id = 3
    tile = 64
    per_tile = (tile // cfg["vision_model"]["patch_size"]) ** 2 // 4
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 1000, (1, args.seq), generator=g)
    tokens[0, 16:16 + args.tiles * per_tile] = image_id
    labels = torch.randint(10, 1000, (1, args.seq), generator=g)
    tiles = torch.randn(args.tiles, 3, tile, tile, generator=g)
    rows, state, ref_loss = [], None, None
    for name, overrides in MODES.items():
        state, loss, mib, seconds = _step(overrides, state, tokens, labels, tiles, image_id)
        ref_loss = loss if ref_loss is None else ref_loss
        rows.append((name, mib, seconds, loss))
    base = rows[0][1]
    lines = [f"## Activation recompute (tiny VLM, {args.seq} tokens, {args.tiles} tiles, fp32)\n",
             "| recompute | activation memory (MiB) | saved vs none | fwd+bwd (s) | loss |",
             "|---|---:|---:|---:|---:|"]
    for name, mib, seconds, loss in rows:
        lines.append(f"| {name} | {mib:.1f} | {100 * (1 - mib / base):.0f}% | {seconds:.2f} | "
                     f"{loss:.6f} |")
    lines.append("\nSaved tensors kept for the backward pass (unique storages, parameters "
                 "excluded). The loss is the same in every mode.")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(abs(r[3] - ref_loss) < 1e-5 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
