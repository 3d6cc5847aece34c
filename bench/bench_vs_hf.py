"""Ours against ``transformers`` on the same weights, interleaved in one process.

Two comparisons of the tiny Nemotron-H (fp32, CPU, batch 1):

1. training step (forward, backward, AdamW) at 1K / 4K / 16K tokens: ours (megatron-core
   ``MambaModel`` with the local specs) vs ``NemotronHForCausalLM`` in a plain PyTorch loop,
   both with ``torch.optim.AdamW``; the first step's losses are checked equal; plus, where the
   CPU has bf16 (``--bf16-lengths``), the same step under ``torch.autocast("cpu", bfloat16)``
   for both (forward and backward inside autocast: megatron's linear layers run their backward
   matmuls as ordinary ops, which autocast must also cover), a row of its own;
2. greedy generation, 512-token prompt + 64 new tokens: ours with the decode state
   (``megatron_vlm.evaluation.generate.greedy_generate``) vs ``generate(use_cache=True)``;
   the generated tokens are checked equal;
3. the tiny VLM's training step at ``--vlm-lengths`` (default 1K / 4K / 16K; half the tokens are image
   tokens: 128 px tiles, 16 tokens each; RADIO's training-time CPE crop off): ours
   (``NemotronVLModel``) vs its export loaded as
   ``transformers``' ``nemotron_h_omni`` (``AutoModelForImageTextToText``), same weights through
   the converter; first-step losses checked equal;
4. one Mamba2 block and one attention block alone (norm + mixer + residual, the same layer of
   both models), forward + backward of ``mean(out**2)`` at ``--layer-lengths``; outputs checked
   equal;
5. activation memory of one training step: the bytes of the distinct tensors autograd saves
   for backward during the forward (parameters excluded; bench_memory's meter), which is what a
   step holds at its peak besides weights, gradients and optimizer state (equal on both sides).

Ours runs its CPU Mamba path (depthwise convolution + SSD scan) through ``torch.compile``
(``mamba_ops.use_torch_compile``, the recipes' ``train.compile_cpu_ops``) unless ``--no-compile``;
one more row gives the 4K training step with it off, timed in the same rounds (ours, transformers,
ours eager, ...). The warm-up round includes the compilation.
The activation-memory rows are measured without it (what the planner models).

Timing: after warm-up, A, B, A, B, ... (``--repeats`` pairs); the table gives each side's median,
the ratio of medians (ours / transformers, in tokens/s) and the spread (the lowest and highest
per-pair ratio), so load from other processes hits both sides alike. By default the clock is the
CPU time of this process with one torch thread (tokens per CPU-second, like bench_data): on a
shared, overloaded machine wall time mostly measures the scheduler. ``--wall-time --threads 2``
gives wall-clock rates.

    python -m bench.bench_vs_hf --out results.md [--lengths 1024 4096 16384] [--repeats 3]
        [--wall-time] [--threads N] [--skip-generate]
"""

import argparse
import contextlib
import statistics
import time
import warnings
from pathlib import Path

import torch

from bench import emit, load_average

warnings.filterwarnings("ignore")


def build_pair(max_len: int):
    """Ours and transformers' model with identical random weights (dt clamped as HF does)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from megatron_vlm.models.config import load_model_config
    from megatron_vlm.conversion.hf_mapping_llm import hf_config_kwargs
    from megatron_vlm.models.llm import build_hybrid_llm

    cfg = load_model_config("nemotron_h_tiny")
    cfg.update(mamba_dt_clamp_min=0.001, params_dtype="float32", max_sequence_length=max_len)
    torch.manual_seed(0)
    hf_cfg = NemotronHConfig(**hf_config_kwargs(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf = NemotronHForCausalLM(hf_cfg)
    ours = build_hybrid_llm(cfg, impl="local", use_cpu_initialization=True)
    copy_weights(hf, ours, cfg)
    return cfg, ours, hf


def copy_weights(hf, ours, cfg):
    """transformers' weights into ours. Training rows update both models, with gradients that
    agree only to rounding (and ours also steps in its eager rounds), so each measurement
    starts from this again: same weights on both sides."""
    from megatron_vlm.conversion.hf_mapping_llm import hf_to_megatron

    missing, unexpected = ours.load_state_dict(hf_to_megatron(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)


def build_vlm_pair(max_len: int, workdir: Path):
    """The tiny VLM, ours and exported to a ``nemotron_h_omni`` directory and loaded back."""
    from transformers import AutoModelForImageTextToText

    from megatron_vlm.conversion import hf as convert
    from megatron_vlm.models.config import load_model_config
    from megatron_vlm.models.vlm import build_vlm, load_vlm_config

    cfg = load_vlm_config(str(Path(__file__).resolve().parents[1] / "recipes/models/vlm_tiny.yaml"))
    cfg["language_model"] = load_model_config(dict(
        cfg["language_model"], mamba_dt_clamp_min=0.001, max_sequence_length=max_len))
    # Megatron-LM RADIO's random position-embedding crop in training has no transformers
    # counterpart: off, so both sides do the same work and the first-step losses compare.
    cfg["vision_model"]["cpe_train_crop"] = False
    vocab = cfg["language_model"]["vocab_size"]
    ids = {"vocab_size": vocab, "eos_id": 2, "pad_id": 0, "bos_id": None, "image_id": 5,
           "img_start_id": 6, "img_end_id": 7}
    torch.manual_seed(0)
    ours = build_vlm(cfg, image_token_id=ids["image_id"], img_end_token_id=ids["img_end_id"],
                     impl="local", use_cpu_initialization=True, params_dtype=torch.float32)
    state = convert.full_state(ours)
    convert.export_hf(state.__getitem__, {k: (v.shape, v.dtype) for k, v in state.items()}, cfg,
                      "vlm", workdir, ids)
    theirs = AutoModelForImageTextToText.from_pretrained(str(workdir), attn_implementation="sdpa",
                                                         dtype=torch.float32)
    return cfg, ids, ours, theirs


def vlm_batch(cfg: dict, ids: dict, length: int, tile: int = 128):
    """[1, length] ids, half of them the placeholders of 128 px tiles, and those tiles."""
    from megatron_vlm.conversion.verify import packed_patches
    from megatron_vlm.data.tiling import tokens_per_tile

    g = torch.Generator().manual_seed(length)
    per_tile = tokens_per_tile(tile, cfg["vision_model"]["patch_size"], cfg["downsample_ratio"])
    n = max(1, length // 2 // (per_tile + 2))
    text = torch.randint(8, ids["vocab_size"], (1, length), generator=g)
    for i in range(n):
        at = 1 + i * (per_tile + 2)
        text[0, at] = ids["img_start_id"]
        text[0, at + 1:at + 1 + per_tile] = ids["image_id"]
        text[0, at + 1 + per_tile] = ids["img_end_id"]
    tiles = torch.randn(n, 3, tile, tile, generator=g)
    pixels, grid = packed_patches(tiles, cfg["vision_model"]["patch_size"])
    return text, tiles, pixels, grid


def train_step(loss_fn, opt, precision=contextlib.nullcontext):
    """One training step as a function: forward and backward inside ``precision()``, then AdamW."""
    def run():
        opt.zero_grad(set_to_none=True)
        with precision():
            loss = loss_fn()
            loss.backward()
        opt.step()
        return loss.item()
    return run


def bench_train_vlm(ours, theirs, cfg, ids, lengths, repeats):
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-5)
    ours.train(), theirs.train()
    rows = []
    for L in lengths:
        text, tiles, pixels, grid = vlm_batch(cfg, ids, L)
        labels = torch.roll(text, -1, dims=1)

        def loss_ours():
            return ours(text, tiles=tiles, labels=labels)[:, :-1].mean()

        def loss_hf():
            return theirs(input_ids=text, pixel_values=pixels, image_grid_hw=grid, labels=text,
                          use_cache=False).loss

        with torch.no_grad():
            diff = abs(loss_ours().item() - loss_hf().item())
        ta, tb = interleaved(train_step(loss_ours, opt_a), train_step(loss_hf, opt_b),
                             repeats=repeats if L < 16384 else max(2, repeats - 2))
        row = (L, diff) + summary(L, ta, tb)
        rows.append(row)
        print(f"train VLM L={L}: ours {row[2]:,.0f} tok/s, transformers {row[3]:,.0f} tok/s, "
              f"ratio {row[4]:.2f} [{row[5]:.2f}, {row[6]:.2f}], |loss diff| {row[1]:.1e}",
              flush=True)
    return rows


def bench_layers(ours, hf, lengths, repeats):
    """Rows (name, L, max |out diff|, ours tok/s, theirs tok/s, ratio, lo, hi) per block kind."""
    kinds = list(ours.decoder.layer_type_list)
    hidden = ours.config.hidden_size
    rows = []
    for kind, name in (("M", "Mamba2 block"), ("*", "attention block")):
        i = kinds.index(kind)
        block_a, block_b = ours.decoder.layers[i], hf.model.layers[i]
        for L in lengths:
            x = torch.randn(1, L, hidden, generator=torch.Generator().manual_seed(L))
            xa = x.transpose(0, 1).contiguous().requires_grad_()  # megatron: [s, b, h]
            xb = x.clone().requires_grad_()

            def out_a():
                out = block_a(hidden_states=xa, attention_mask=None)
                return (out[0] if isinstance(out, tuple) else out).transpose(0, 1)

            def out_b():
                return block_b(xb)

            def fwd_bwd(fn, x_in):
                def run():
                    x_in.grad = None
                    fn().square().mean().backward()
                return run

            with torch.no_grad():
                diff = (out_a() - out_b()).abs().max().item()
            ta, tb = interleaved(fwd_bwd(out_a, xa), fwd_bwd(out_b, xb), repeats=repeats)
            row = (name, L, diff) + summary(L, ta, tb)
            rows.append(row)
            print(f"{name} L={L}: ours {row[3]:,.0f} tok/s, transformers {row[4]:,.0f} tok/s, "
                  f"ratio {row[5]:.2f} [{row[6]:.2f}, {row[7]:.2f}], max |out diff| {diff:.1e}", flush=True)
    return rows


def llm_losses(ours, hf, cfg, L: int):
    """Functions giving each side's mean next-token loss on the same [1, L] random ids (HF
    predicts L-1 tokens: ours drops its last position)."""
    ids = torch.randint(0, cfg["vocab_size"], (1, L), generator=torch.Generator().manual_seed(L))
    labels = torch.roll(ids, -1, dims=1)
    return (lambda: ours(ids, None, None, labels=labels)[:, :-1].mean(),
            lambda: hf(input_ids=ids, labels=ids, use_cache=False).loss)


def bench_activation_memory(ours, hf, cfg, lengths):
    """Rows (L, ours MiB, transformers MiB): bytes saved for backward by one training forward."""
    from bench.bench_memory import SavedTensorMeter

    ours.train(), hf.train()
    rows = []
    for L in lengths:
        sides = {}
        for side, model, forward in zip(("ours", "hf"), (ours, hf), llm_losses(ours, hf, cfg, L)):
            meter = SavedTensorMeter(model.parameters())
            meter.bucket = "step"
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                loss = forward()
            del loss
            sides[side] = meter.totals()["step"] / 2**20
        rows.append((L, sides["ours"], sides["hf"]))
        print(f"activation memory L={L}: ours {sides['ours']:.1f} MiB, transformers {sides['hf']:.1f} MiB",
              flush=True)
    return rows


CLOCK = time.perf_counter  # main() picks time.process_time unless --wall-time


def interleaved(*fns, repeats: int, warmup: int = 1):
    """Times of each function, run in turn (A, B, [C,] A, B, ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, series in zip(fns, times):
            t0 = CLOCK()
            fn()
            series.append(CLOCK() - t0)
    return times


def summary(work: float, ta, tb):
    """(ours units/s, theirs units/s, ratio of medians, lowest pair ratio, highest pair ratio)."""
    ma, mb = statistics.median(ta), statistics.median(tb)
    pairs = [b / a for a, b in zip(ta, tb)]
    return work / ma, work / mb, mb / ma, min(pairs), max(pairs)


def cpu_has_bf16() -> bool:
    """True when oneDNN runs bf16 natively (AVX512-BF16 or AMX), so the bf16 rows mean something."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def without_compile(fn):
    """fn with ours' CPU Mamba path eager for its duration."""
    from megatron_vlm.models import mamba_ops

    def run():
        previous = mamba_ops.use_torch_compile(False)
        try:
            return fn()
        finally:
            mamba_ops.use_torch_compile(previous)
    return run


def bench_train(ours, hf, cfg, lengths, repeats, bf16: bool = False, eager_lengths=()):
    """Rows (L, |loss diff|, ours tok/s, theirs tok/s, ratio, lo, hi) and, for ``eager_lengths``,
    the same for ours without torch.compile, timed in the same rounds (A, B, A-eager, ...), so
    both rows share transformers' times."""
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    ours.train(), hf.train()

    def precision():
        if bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    rows, eager_rows = [], []
    for L in lengths:
        copy_weights(hf, ours, cfg)
        loss_ours, loss_hf = llm_losses(ours, hf, cfg, L)
        # Same weights before the first step: the losses must agree.
        with torch.no_grad(), precision():
            lb = loss_hf().item()
            diffs = [abs(loss_ours().item() - lb), abs(without_compile(loss_ours)().item() - lb)]
        fns = [train_step(loss_ours, opt_a, precision), train_step(loss_hf, opt_b, precision)]
        if L in eager_lengths:
            fns.append(without_compile(fns[0]))
        times = interleaved(*fns, repeats=repeats if L < 16384 else max(2, repeats - 2))
        tag = " bf16" if bf16 else ""
        for series, diff, out, label in zip(times[::2], diffs, (rows, eager_rows), ("", " (ours eager)")):
            row = (L, diff) + summary(L, series, times[1])
            out.append(row)
            print(f"train{tag}{label} L={L}: ours {row[2]:,.0f} tok/s, transformers {row[3]:,.0f} tok/s, "
                  f"ratio {row[4]:.2f} [{row[5]:.2f}, {row[6]:.2f}], |loss diff| {row[1]:.1e}", flush=True)
    return rows, eager_rows


def bench_generate(ours, hf, cfg, prompt_len: int, new_tokens: int, repeats: int):
    from megatron_vlm.evaluation.generate import greedy_generate

    ours.eval(), hf.eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(7))
    out = {}

    def gen_ours():
        out["ours"] = greedy_generate(ours, ids[0].tolist(), max_new_tokens=new_tokens).tokens

    @torch.no_grad()
    def gen_hf():
        seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                          pad_token_id=0)
        out["hf"] = seq[0, prompt_len:].tolist()

    ta, tb = interleaved(gen_ours, gen_hf, repeats=repeats)
    same = sum(a == b for a, b in zip(out["ours"], out["hf"]))
    row = (prompt_len, new_tokens, same) + summary(new_tokens, ta, tb)
    print(f"generate {prompt_len}+{new_tokens}: ours {row[3]:.1f} tok/s, transformers {row[4]:.1f} "
          f"tok/s, ratio {row[5]:.2f} [{row[6]:.2f}, {row[7]:.2f}], {same}/{new_tokens} tokens equal",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (16K training rows: 2 fewer)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--wall-time", action="store_true",
                    help="time wall-clock seconds (default: CPU-seconds of this process, which other "
                         "load on a shared machine distorts far less)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="ours without torch.compile of its CPU Mamba path")
    ap.add_argument("--eager-lengths", type=int, nargs="*", default=[4096],
                    help="with compile on: lengths of the training rows also timed without it, "
                         "in the same rounds")
    ap.add_argument("--vlm-lengths", type=int, nargs="*", default=[1024, 4096, 16384],
                    help="VLM training-step lengths (none: skip the VLM rows)")
    ap.add_argument("--layer-lengths", type=int, nargs="*", default=[4096, 16384],
                    help="lengths of the single-block rows (none: skip)")
    ap.add_argument("--memory-lengths", type=int, nargs="*", default=[1024, 4096, 16384],
                    help="lengths of the activation-memory rows (none: skip)")
    ap.add_argument("--bf16-lengths", type=int, nargs="*", default=[4096],
                    help="lengths of the bf16-autocast training rows (none: skip; skipped anyway "
                         "when the CPU has no native bf16)")
    args = ap.parse_args()
    global CLOCK
    args.cpu_time = not args.wall_time
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)

    from megatron_vlm.distributed import destroy_distributed, initialize_distributed
    from megatron_vlm.models import mamba_ops

    initialize_distributed()
    cfg, ours, hf = build_pair(max(args.lengths + [args.prompt + args.new_tokens]))
    gen = None if args.skip_generate else bench_generate(ours, hf, cfg, args.prompt,
                                                         args.new_tokens, args.repeats)
    mamba_ops.use_torch_compile(args.compile)
    train, eager = bench_train(ours, hf, cfg, args.lengths, args.repeats,
                               eager_lengths=args.eager_lengths if args.compile else ())
    copy_weights(hf, ours, cfg)
    layers = bench_layers(ours, hf, args.layer_lengths, args.repeats) if args.layer_lengths else []
    mamba_ops.use_torch_compile(False)
    memory = bench_activation_memory(ours, hf, cfg, args.memory_lengths) if args.memory_lengths else []
    mamba_ops.use_torch_compile(args.compile)
    train_vlm = []
    if args.vlm_lengths:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            vcfg, ids, vours, vhf = build_vlm_pair(max(args.vlm_lengths), Path(tmp))
            train_vlm = bench_train_vlm(vours, vhf, vcfg, ids, args.vlm_lengths, args.repeats)
    bf16_rows = []
    if args.bf16_lengths and cpu_has_bf16():
        bf16_rows, _ = bench_train(ours, hf, cfg, args.bf16_lengths, args.repeats, bf16=True)
    destroy_distributed()

    k = lambda L: f"{L // 1024}K" if L % 1024 == 0 else str(L)  # noqa: E731
    lines = [
        "## Ours vs transformers (bench_vs_hf)", "",
        f"Tiny Nemotron-H (and the tiny VLM), same weights, fp32, batch 1, {torch.get_num_threads()} CPU threads, "
        f"{'CPU-seconds of the process' if args.cpu_time else 'wall time'}; "
        f"{'ours with its CPU Mamba path compiled (torch.compile), except where a row says not' if args.compile else 'ours eager'}; "
        "interleaved A, B, A, B after one warm-up pair; ratio = ours / transformers tokens/s "
        "(ratio of medians), spread = lowest and highest per-pair ratio; the eager 4K row shares its "
        "rounds, and transformers' times, with the compiled one.", "",
        "| measurement | ours tok/s | transformers tok/s | ratio | spread | check |",
        "|---|---:|---:|---:|---|---|",
    ]
    for L, diff, a, b, r, lo, hi in train:
        lines.append(f"| training step {k(L)} (fwd+bwd+AdamW) | {a:,.0f} | {b:,.0f} | {r:.2f}x | "
                     f"{lo:.2f}-{hi:.2f} | first-step loss diff {diff:.1e} |")
    for L, diff, a, b, r, lo, hi in eager:
        lines.append(f"| training step {k(L)}, ours without torch.compile | {a:,.0f} | {b:,.0f} | {r:.2f}x | "
                     f"{lo:.2f}-{hi:.2f} | first-step loss diff {diff:.1e} |")
    for L, diff, a, b, r, lo, hi in train_vlm:
        lines.append(f"| training step {k(L)} VLM (half image tokens, 128 px tiles; vs "
                     f"nemotron_h_omni) | {a:,.0f} | {b:,.0f} | {r:.2f}x | {lo:.2f}-{hi:.2f} | "
                     f"first-step loss diff {diff:.1e} |")
    for L, diff, a, b, r, lo, hi in bf16_rows:
        lines.append(f"| training step {k(L)}, bf16 autocast (fwd+bwd; fp32 weights and AdamW) | "
                     f"{a:,.0f} | {b:,.0f} | {r:.2f}x | {lo:.2f}-{hi:.2f} | "
                     f"first-step loss diff {diff:.1e} |")
    for name, L, diff, a, b, r, lo, hi in layers:
        lines.append(f"| {name} alone {k(L)} (fwd+bwd) | {a:,.0f} | {b:,.0f} | {r:.2f}x | {lo:.2f}-{hi:.2f} | "
                     f"max output diff {diff:.1e} |")
    if gen:
        p, n, same, a, b, r, lo, hi = gen
        lines.append(f"| greedy generation, {p}-token prompt + {n} new (ours: decode state; "
                     f"transformers: its cache) | {a:.1f} | {b:.1f} | {r:.2f}x | {lo:.2f}-{hi:.2f} "
                     f"| {same}/{n} tokens equal |")
    if memory:
        lines += ["", "Activation memory of one training step (fp32, batch 1): the distinct tensors autograd "
                  "saves for backward during the forward, parameters excluded (weights, gradients and AdamW "
                  "state are the same on both sides).", "",
                  "| tokens | ours MiB | transformers MiB | ours / transformers |", "|---:|---:|---:|---:|"]
        lines += [f"| {k(L)} | {a:,.1f} | {b:,.1f} | {a / b:.2f} |" for L, a, b in memory]
    lines += ["", f"Machine load at the end: {load_average()} "
              "(1/5/15 min); the machine is shared, so absolute numbers move, ratios less."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
