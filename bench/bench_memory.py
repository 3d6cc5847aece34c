"""Activation memory of one training step, measured on CPU per layer type, against the planner.

For the tiny LLM and the tiny VLM at 1K / 4K / 16K tokens and recompute none / selective / full,
every tensor autograd saves during the forward pass is caught by a saved-tensor hook and charged
to the layer type running at that moment (storages counted once, parameters excluded). That sum
is the activation memory a step holds at the end of its forward, its peak. With full recompute
each layer keeps only its input, and during its backward one layer's activations live again:
the measured figure is the saved inputs plus the largest single layer of the ``none`` run.
Selective recompute re-runs megatron's core attention (``checkpoint_core_attention``).

The planner (``megatron_vlm.planning``, impl ``torch``, fp32) predicts the same quantities; the
table gives both and the ratio.

    python -m bench.bench_memory --out results.md [--lengths 1024 4096 16384]
"""

import argparse
import collections
from pathlib import Path
from typing import Dict

import torch

IMAGE_ID, TILE = 7, 128
KINDS = {"M": "mamba", "*": "attention", "-": "mlp"}


class SavedTensorMeter:
    """Bytes of distinct storages saved for backward, charged to the current bucket."""

    def __init__(self, exclude):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.bucket = None
        self.seen: Dict[str, dict] = collections.defaultdict(dict)

    def pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if self.bucket is not None and ptr not in self.exclude:
            self.seen[self.bucket][ptr] = st.nbytes()
        return t

    def totals(self) -> Dict[str, float]:
        return {k: float(sum(v.values())) for k, v in self.seen.items()}

    def enter(self, name):
        def hook(module, *args):
            self.bucket = name
        return hook


def _checkpointed(layer):
    """Full recompute of one layer: keep its input only (megatron's reentrant checkpoint)."""
    from megatron.core import tensor_parallel

    forward = layer.forward

    def run(hidden_states, *args, **kwargs):
        rest = []

        def f(h):
            out = forward(h, *args, **kwargs)
            if isinstance(out, tuple):
                rest[:] = out[1:]
                return out[0]
            return out
        out = tensor_parallel.checkpoint(f, False, hidden_states)
        return (out, *rest) if rest else out

    layer.forward = run


def measure(model, tokens, tiles=None, mode: str = "none") -> Dict[str, float]:
    """Saved bytes per bucket (mamba, attention, mlp, logits, vision, connector) of one forward
    of ``model`` (the LLM or the VLM); parameters are excluded."""
    llm = getattr(model, "language_model", model)
    meter = SavedTensorMeter(model.parameters())
    handles = []
    for i, (layer, kind) in enumerate(zip(llm.decoder.layers, llm.decoder.layer_type_list)):
        handles.append(layer.register_forward_pre_hook(meter.enter(f"{KINDS[kind]}#{i}")))
        if kind == "*":
            layer.self_attention.checkpoint_core_attention = mode == "selective"
    handles.append(llm.decoder.final_norm.register_forward_pre_hook(meter.enter("logits")))
    handles.append(llm.embedding.register_forward_pre_hook(meter.enter("embedding")))
    if hasattr(model, "vision_model"):
        handles.append(model.vision_model.register_forward_pre_hook(meter.enter("vision")))
        handles.append(model.vision_projection.register_forward_pre_hook(meter.enter("connector")))
        for i, layer in enumerate(model.vision_model.decoder.layers):
            handles.append(layer.register_forward_pre_hook(meter.enter(f"vision#{i}")))
    saved_forwards = []
    if mode == "full":
        for layer in llm.decoder.layers:
            saved_forwards.append(layer.forward)
            _checkpointed(layer)
        if hasattr(model, "vision_model"):
            for layer in model.vision_model.decoder.layers:
                saved_forwards.append(layer.forward)
                _checkpointed(layer)
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            if tiles is None:
                out = model(tokens, None, None, labels=tokens)
            else:
                out = model(tokens, tiles=tiles, labels=tokens)
        del out
    finally:
        for h in handles:
            h.remove()
        layers = list(llm.decoder.layers) + (list(model.vision_model.decoder.layers)
                                             if mode == "full" and hasattr(model, "vision_model") else [])
        for layer, fwd in zip(layers, saved_forwards):
            layer.forward = fwd
        for layer, kind in zip(llm.decoder.layers, llm.decoder.layer_type_list):
            if kind == "*":
                layer.self_attention.checkpoint_core_attention = False
    per_layer = meter.totals()
    per_layer.pop("embedding", None)
    totals = collections.defaultdict(float)
    for bucket, nbytes in per_layer.items():
        totals[bucket.split("#")[0]] += nbytes
    totals = dict(totals)
    # the largest single layer (LLM or ViT): what full recompute rebuilds during one backward
    totals["_largest layer"] = max(v for k, v in per_layer.items() if "#" in k)
    return totals


def vlm_inputs(seq: int, tokens_per_tile: int = 16, image_fraction: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tiles = int(seq * image_fraction) // tokens_per_tile
    ids = torch.randint(20, 4000, (1, seq), generator=g)
    ids[0, 8:8 + tiles * tokens_per_tile] = IMAGE_ID
    return ids, torch.randn(tiles, 3, TILE, TILE, generator=g)


def planned(shape, seq: int, mode: str, vlm: bool) -> Dict[str, float]:
    """The planner's activation bytes per bucket for one micro-batch on one CPU rank (fp32)."""
    from megatron_vlm import planning

    L = planning.Layout(seq_length=seq, precision="fp32", recompute=mode, impl="torch",
                        tile_size=TILE, image_fraction=0.5 if vlm else 0.0)
    counts = planning.parameter_counts(shape)
    stage = planning._stage_memory(shape, L, 0, shape.pattern, counts)
    acts = dict(stage.activations)
    if mode == "full":
        # charge the stored inputs to the layer types, as the meter does
        inp = planning.layer_input_bytes(shape, L, seq, 1)
        for k, name in KINDS.items():
            acts[name] = shape.pattern.count(k) * inp
        acts["recompute peak"] = acts.pop("recomputed layer")
        acts.pop("layer inputs")
    return acts


def run(lengths, modes=("none", "selective", "full")):
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.models.llm import build_hybrid_llm
    from megatron_vlm.models.vlm import build_vlm
    from megatron_vlm.planning import ModelShape

    initialize_distributed(tp=1, pp=1)
    torch.manual_seed(0)
    llm = build_hybrid_llm("nemotron_h_tiny", impl="local", use_cpu_initialization=True)
    vlm = build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_ID, use_cpu_initialization=True)
    shapes = {"LLM": ModelShape.load("nemotron_h_tiny"), "VLM": ModelShape.load("vlm_tiny")}
    rows = []
    for name, model in (("LLM", llm), ("VLM", vlm)):
        for seq in lengths:
            if name == "LLM":
                tokens, tiles = torch.randint(0, 4000, (1, seq)), None
            else:
                tokens, tiles = vlm_inputs(seq)
            base = measure(model, tokens, tiles, "none")
            for mode in modes:
                got = dict(base if mode == "none" else measure(model, tokens, tiles, mode))
                got.pop("_largest layer")
                if mode == "full":
                    got["recompute peak"] = base["_largest layer"]
                want = planned(shapes[name], seq, mode, name == "VLM")
                for bucket in sorted(set(got) | set(want)):
                    m, p = got.get(bucket, 0.0), want.get(bucket, 0.0)
                    if m or p:
                        rows.append((name, seq, mode, bucket, m, p))
                tm, tp = sum(got.values()), sum(want.values())
                rows.append((name, seq, mode, "total", tm, tp))
                print(f"{name} {seq} {mode}: measured {tm / 2**20:.1f} MiB, planned "
                      f"{tp / 2**20:.1f} MiB ({tp / tm:.3f})", flush=True)
    return rows


PARTS = ("mamba", "attention", "mlp", "vision", "connector", "logits", "recompute peak", "total")


def markdown(rows) -> str:
    """One row per (model, tokens, recompute); each part as 'measured MiB (planned / measured)'."""
    out = ["## Activation memory: planner vs measurement (bench_memory)", "",
           "Saved tensors of one training step's forward (fp32, batch 1, CPU, local specs), per "
           "layer type summed over the model's layers; full recompute: the stored layer inputs plus "
           "the largest layer, rebuilt during its backward (`recompute peak`). VLM: half the tokens "
           "are image tokens (128 px tiles, 16 tokens each). Each cell: measured MiB (planner / "
           "measured); planner: `megatron_vlm/planning.py`, impl `torch`.", "",
           "| model | tokens | recompute | " + " | ".join(PARTS) + " |",
           "|---|---:|---|" + "---:|" * len(PARTS)]
    table = {}
    for name, seq, mode, bucket, m, p in rows:
        table.setdefault((name, seq, mode), {})[bucket] = (m, p)
    for (name, seq, mode), parts in table.items():
        cells = []
        for part in PARTS:
            if part in parts and parts[part][0]:
                m, p = parts[part]
                cell = f"{m / 2**20:.2f} ({p / m:.3f})"
                cells.append(f"**{cell}**" if part == "total" else cell)
            else:
                cells.append("-")
        out.append(f"| {name} | {seq} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    args = ap.parse_args()
    args.out.write_text(markdown(run(args.lengths)))


if __name__ == "__main__":
    main()
