"""Hybrid LLM throughput on this machine (CPU unless a GPU is present).

Two tables:
1. the Mamba2 SSD scan alone (the tiny model's mixer sizes), forward and forward+backward;
2. one training step (forward, backward, AdamW) of the tiny model, hybrid pattern ``M*M-M-``
   against an attention-only model ``*-*-*-`` of the same width and depth,
at sequence lengths 1K, 4K, 16K (batch 1). tokens/s = tokens per step / median step time.
The SSD scan is linear in length (per-token cost flat); attention is quadratic, so attention-only
throughput falls with length while the hybrid's falls only by its single attention layer.

    python -m bench.bench_llm --out results.md [--lengths 1024 4096 16384] [--repeats 3]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import emit, load_average


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):  # allocator, oneDNN primitive creation, autograd first-use costs
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ssd(lengths, repeats, cfg):
    from megatron_vlm.models.ssd_scan import ssd_chunked_scan

    h, p, g, n = cfg["mamba_num_heads"], cfg["mamba_head_dim"], cfg["mamba_num_groups"], cfg["mamba_state_dim"]
    chunk = cfg["mamba_chunk_size"]
    rows = []
    for L in lengths:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, L, h, p, generator=gen, requires_grad=True)
        dt = F.softplus(torch.randn(1, L, h, generator=gen) - 2).requires_grad_(True)
        A = -torch.rand(h, generator=gen).requires_grad_(True)
        B = torch.randn(1, L, g, n, generator=gen, requires_grad=True)
        C = torch.randn(1, L, g, n, generator=gen, requires_grad=True)

        def fwd():
            with torch.no_grad():
                ssd_chunked_scan(x, dt, A, B, C, chunk)

        def fwd_bwd():
            ssd_chunked_scan(x, dt, A, B, C, chunk).sum().backward()

        t_f, t_fb = _median_time(fwd, repeats), _median_time(fwd_bwd, repeats)
        rows.append((L, L / t_f, L / t_fb))
        print(f"ssd L={L}: fwd {L / t_f:,.0f} tok/s, fwd+bwd {L / t_fb:,.0f} tok/s", flush=True)
    return rows


def bench_layers(lengths, repeats, cfg):
    """One Mamba2 layer vs one attention layer of the tiny model, forward+backward."""
    from megatron_vlm.models.llm import build_hybrid_llm

    model = build_hybrid_llm(dict(cfg, max_sequence_length=max(lengths)))
    kinds = model.decoder.layer_type_list
    mamba, attn = model.decoder.layers[kinds.index("M")], model.decoder.layers[kinds.index("*")]
    rows = []
    for L in lengths:
        h = torch.randn(L, 1, cfg["hidden_size"], requires_grad=True)

        def run(layer):
            out = layer(hidden_states=h, attention_mask=None)
            (out[0] if isinstance(out, tuple) else out).sum().backward()

        t_m = _median_time(lambda: run(mamba), repeats)
        t_a = _median_time(lambda: run(attn), repeats)
        rows.append((L, L / t_m, L / t_a))
        print(f"layer L={L}: mamba {L / t_m:,.0f} tok/s, attention {L / t_a:,.0f} tok/s", flush=True)
    return rows


def bench_train(lengths, repeats, cfg, pattern):
    from megatron_vlm.models.llm import build_hybrid_llm

    cfg = dict(cfg, hybrid_override_pattern=pattern, max_sequence_length=max(lengths))
    model = build_hybrid_llm(cfg, use_cpu_initialization=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = []
    for L in lengths:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg["vocab_size"], (1, L + 1), generator=gen)

        def step():
            opt.zero_grad(set_to_none=True)
            model(ids[:, :-1], None, None, labels=ids[:, 1:]).mean().backward()
            opt.step()

        t = _median_time(step, repeats)
        rows.append((L, L / t, t))
        print(f"train {pattern} L={L}: {L / t:,.0f} tok/s ({t:.2f} s/step)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from megatron_vlm.distributed import destroy_distributed, initialize_distributed
    from megatron_vlm.models.config import load_model_config
    from megatron_vlm.models.hybrid_specs import resolved_impl

    initialize_distributed()
    cfg = load_model_config("nemotron_h_tiny")
    cfg["params_dtype"] = "float32"
    ssd = bench_ssd(args.lengths, args.repeats, cfg)
    layers = bench_layers(args.lengths, args.repeats, cfg)
    hybrid = bench_train(args.lengths, args.repeats, cfg, cfg["hybrid_override_pattern"])
    attn = bench_train(args.lengths, args.repeats, cfg, "*-*-*-")
    destroy_distributed()

    k = lambda L: f"{L // 1024}K" if L % 1024 == 0 else str(L)  # noqa: E731
    lines = [
        "## Hybrid LLM (Nemotron-H tiny)",
        "",
        f"{torch.get_num_threads()} CPU threads, fp32, batch 1, spec `{resolved_impl()}`; "
        f"tiny model: hidden {cfg['hidden_size']}, Mamba {cfg['mamba_num_heads']} heads x "
        f"{cfg['mamba_head_dim']}, state {cfg['mamba_state_dim']}, chunk {cfg['mamba_chunk_size']}.",
        "",
        "| seq len | SSD scan fwd | SSD scan fwd+bwd | Mamba2 layer fwd+bwd | attention layer "
        f"fwd+bwd | train step hybrid `{cfg['hybrid_override_pattern']}` | train step "
        "attention-only `*-*-*-` | hybrid / attention-only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (L, sf, sfb), (_, lm, la), (_, th, _), (_, ta, _) in zip(ssd, layers, hybrid, attn):
        lines.append(f"| {k(L)} | {sf:,.0f} | {sfb:,.0f} | {lm:,.0f} | {la:,.0f} | {th:,.0f} | "
                     f"{ta:,.0f} | {th / ta:.2f}x |")
    lines += ["", "All throughputs in tokens/s (median of the repeats after warm-up). "
              "The machine's load at run time: "
              f"{load_average()} (1/5/15 min); "
              "other processes on the same cores distort the numbers."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
