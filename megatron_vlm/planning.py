"""Capacity planner: parameters, per-GPU memory, FLOPs and step time of a recipe's layout.

    plan = plan_recipe("recipes/nano_v2_vl/stage2.yaml", Hardware.named("h100"), gpus=256)
    print(plan.report())        # per part, per stage, verdict and the smallest change that fits

No GPU is needed: everything is arithmetic on the model YAMLs and the recipe's layout.

* Parameters per part are the exact counts of the models ``build_hybrid_llm`` / ``build_vlm``
  construct (checked against the built models in tests/planning).
* Memory per GPU = weights + gradients + optimizer state (distributed optimizer sharded over
  DP x CP, as megatron's) + activations + logits, on the worst pipeline stage.
* Activations are counted as the tensors autograd saves, per layer type, for two
  implementations:
  - ``torch``: this repository's CPU path (local specs, chunked SSD scan in plain torch,
    SDPA). Every term is a tensor seen by a saved-tensor hook; bench/bench_memory.py measures
    the tiny models and compares (bench/results.md).
  - ``kernels``: the GPU path (TransformerEngine linears with fused norms, flash attention,
    causal-conv1d and mamba-ssm's chunked scan, which save their inputs and the per-chunk
    cumulative decay and recompute the chunk states in backward). Derived from those kernels'
    ``save_for_backward`` calls; not measured here (no GPU).
* Recompute: ``none``; ``selective`` (megatron's core-attention recompute: the s x s scores of
  non-flash attention are not kept); ``full`` (each layer keeps only its input; one layer's
  activations live again during its backward).
* Sequence parallelism divides the hidden-sized tensors outside the TP region by TP; context
  parallelism divides the sequence by CP (Mamba's all-to-all trades sequence for heads, which
  keeps the per-rank volume at 1/CP); pipeline parallelism keeps min(PP, micro-batches)
  micro-batches in flight on the first stage (1F1B) and one on the last.
* FLOPs per token follow Megatron-LM's ``hybrid_flops`` (Mamba in_proj/scan/out_proj, attention
  by length, MLP, logits; training = 3x forward, 4x with full recompute) plus the ViT per tile
  and the connector per image token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from megatron_vlm.data.tiling import tokens_per_tile
from megatron_vlm.models.config import load_model_config, padded_vocab_size, read_model_yaml

GB = 1e9
RECOMPUTE_MODES = ("none", "selective", "full")
IMPLS = ("kernels", "torch")


# ------------------------------------------------------------------------------------ hardware

@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gb: float          # usable HBM per GPU (decimal GB)
    bf16_tflops: float        # dense peak
    fp8_tflops: float

    @staticmethod
    def named(name: str, memory_gb: Optional[float] = None) -> "Hardware":
        specs = {  # dense peaks of the SXM parts (vendor data sheets)
            "h100": Hardware("h100", 80.0, 989.0, 1979.0),
            "h200": Hardware("h200", 141.0, 989.0, 1979.0),
            "b200": Hardware("b200", 180.0, 2250.0, 4500.0),
        }
        if name not in specs:
            raise ValueError(f"unknown GPU {name!r} (one of {sorted(specs)})")
        hw = specs[name]
        return dataclasses.replace(hw, memory_gb=memory_gb) if memory_gb else hw

    def peak_tflops(self, precision: str) -> float:
        return self.fp8_tflops if precision == "fp8" else self.bf16_tflops


# ------------------------------------------------------------------------------------ model shape

@dataclass
class ModelShape:
    """The architecture numbers the planner needs, from the model YAML(s)."""

    llm: dict
    vision: Optional[dict] = None
    projector_hidden: int = 0
    downsample_ratio: float = 0.5

    @staticmethod
    def load(name_or_path) -> "ModelShape":
        if "language_model" in read_model_yaml(name_or_path)[0]:
            from megatron_vlm.models.vlm import load_vlm_config

            cfg = load_vlm_config(name_or_path)
            return ModelShape(cfg["language_model"], cfg["vision_model"],
                              cfg["projector_hidden_size"], cfg["downsample_ratio"])
        return ModelShape(load_model_config(name_or_path))

    # LLM dimensions
    @property
    def pattern(self) -> str:
        return self.llm["hybrid_override_pattern"]

    def mamba_dims(self):
        c = self.llm
        heads, hd, n, g = (c["mamba_num_heads"], c["mamba_head_dim"], c["mamba_state_dim"],
                           c["mamba_num_groups"])
        d_inner = heads * hd
        return dict(heads=heads, head_dim=hd, state=n, groups=g, d_inner=d_inner,
                    in_proj=2 * d_inner + 2 * g * n + heads, conv_dim=d_inner + 2 * g * n,
                    kernel=c["mamba_conv_kernel"], chunk=c["mamba_chunk_size"])

    def tokens_per_tile(self, tile_size: int) -> int:
        return tokens_per_tile(tile_size, self.vision["patch_size"], self.downsample_ratio)


# ------------------------------------------------------------------------------------ parameters

@dataclass
class PartParams:
    """Parameter elements of one part: split over TP (``sharded``) and replicated per TP rank."""

    sharded: int = 0
    replicated: int = 0

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_rank(self, tp: int) -> float:
        return self.sharded / tp + self.replicated

    def __add__(self, other: "PartParams") -> "PartParams":
        return PartParams(self.sharded + other.sharded, self.replicated + other.replicated)

    def scaled(self, k: int) -> "PartParams":
        return PartParams(self.sharded * k, self.replicated * k)


def llm_layer_params(shape: ModelShape, kind: str) -> PartParams:
    c, h = shape.llm, shape.llm["hidden_size"]
    if kind == "M":
        m = shape.mamba_dims()
        sharded = (h * m["in_proj"] + m["conv_dim"] * (m["kernel"] + 1) + 3 * m["heads"]
                   + m["d_inner"] + m["d_inner"] * h)
        return PartParams(sharded, h)  # + the pre-norm weight fused into in_proj
    if kind == "*":
        kv, nq, ng = c["kv_channels"], c["num_attention_heads"], c["num_query_groups"]
        return PartParams(h * (nq + 2 * ng) * kv + nq * kv * h, h)
    if kind == "-":
        return PartParams(2 * h * c["ffn_hidden_size"], h)
    raise ValueError(f"unknown layer symbol {kind!r} in hybrid_override_pattern")


def vit_layer_params(v: dict) -> PartParams:
    h, f = v["hidden_size"], v["ffn_hidden_size"]
    qkv_b = 3 * h if v.get("add_qkv_bias", True) else 0
    lin_b = v.get("add_bias_linear", True)
    sharded = 3 * h * h + qkv_b + h * h + h * f + (f if lin_b else 0) + f * h
    replicated = 4 * h + (2 * h if lin_b else 0)  # two LayerNorms (w + b), row-parallel biases
    return PartParams(sharded, replicated)


def parameter_counts(shape: ModelShape, tp: int = 1) -> Dict[str, PartParams]:
    """Parameters per part, as the built model holds them at tensor-parallel size ``tp``
    (the vocabulary is padded to a multiple of make_vocab_size_divisible_by x tp)."""
    c, h = shape.llm, shape.llm["hidden_size"]
    vocab = padded_vocab_size(c, tp)
    parts: Dict[str, PartParams] = {"embedding": PartParams(vocab * h, 0)}
    for kind, name in (("M", "mamba"), ("*", "attention"), ("-", "mlp")):
        parts[name] = llm_layer_params(shape, kind).scaled(shape.pattern.count(kind))
    parts["final_norm"] = PartParams(0, h)
    parts["output_layer"] = PartParams(vocab * h if c["untie_embeddings_and_output_weights"] else 0, 0)
    if shape.vision is not None:
        v = shape.vision
        vh, p = v["hidden_size"], v["patch_size"]
        table = (v["max_img_size"] // p) ** 2
        parts["vision"] = PartParams(v["num_channels"] * p * p * vh, (table + v["class_token_len"]) * vh) \
            + vit_layer_params(v).scaled(v["num_layers"])
        merged = vh * round(1 / shape.downsample_ratio) ** 2
        parts["connector"] = PartParams(merged * shape.projector_hidden + shape.projector_hidden * h,
                                        merged)
    return parts


LLM_PARTS = ("embedding", "mamba", "attention", "mlp", "final_norm", "output_layer")


def part_totals(counts: Dict[str, PartParams]) -> Dict[str, int]:
    """{"vision", "connector", "llm", "total"} element counts (the VLM's freezable parts)."""
    out = {"llm": sum(counts[k].total for k in LLM_PARTS)}
    for k in ("vision", "connector"):
        if k in counts:
            out[k] = counts[k].total
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------ layout

@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    seq_length: int = 4096
    micro_batch: int = 1
    global_batch: int = 1
    precision: str = "bf16"             # fp32 | bf16 | fp8
    distributed_optimizer: bool = True
    recompute: str = "none"             # none | selective | full
    recompute_vision: bool = True
    cp_comm_type: str = "p2p"
    flash: bool = True
    impl: str = "kernels"               # kernels (GPU) | torch (this repository's CPU path)
    frozen: tuple = ()                  # parts without gradients / optimizer state
    tile_size: int = 512
    image_fraction: float = 0.5         # share of the sequence that is image tokens (VLM)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def microbatches(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.dp))

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def describe(self) -> str:
        sp = " sp" if self.sequence_parallel else ""
        return (f"tp={self.tp} pp={self.pp} cp={self.cp} dp={self.dp}{sp} mbs={self.micro_batch} "
                f"seq={self.seq_length} recompute={self.recompute} {self.precision}")


# ------------------------------------------------------------------------------------ activations

def _terms_bytes(terms: List[tuple]) -> float:
    return sum(elems * nbytes for elems, nbytes in terms)


def mamba_activation_bytes(shape: ModelShape, L: Layout, s: int, b: int) -> float:
    """Saved tensors of one Mamba2 layer for b sequences of s tokens (local to this CP rank)."""
    m, h, a = shape.mamba_dims(), shape.llm["hidden_size"], L.act_bytes
    t = L.tp
    H, G, N, P, di = m["heads"] / t, m["groups"] / t, m["state"], m["head_dim"], m["d_inner"] / t
    proj, conv, q = m["in_proj"] / t, m["conv_dim"] / t, m["chunk"]
    tok = b * s
    h_local = h / t if L.sequence_parallel else h
    if L.impl == "kernels":
        terms = [
            (2 * tok * h_local, a),             # norm input, TE's saved norm output (local shard)
            (tok, 4),                           # rstd
            (tok * proj, a),                    # in_proj output: z, xBC (conv input), dt
            (tok * conv, a),                    # conv output: x, B, C of the scan
            (tok * di, a),                      # scan output
            (tok * H, 4),                       # per-chunk cumulative decay (fp32)
            (3 * tok * di, a),                  # gated RMSNorm: silu(z), y * silu(z), normalised
            (tok * G, 4),                       # its rstd
            (tok * di, a),                      # out_proj input
        ]
        return _terms_bytes(terms)
    c = math.ceil(s / q)
    f = 4  # the chunked scan computes in fp32
    gathered = h if L.sequence_parallel else 0  # local norm-linear saves the gathered input too
    terms = [
        (tok * (3 * h_local if not L.sequence_parallel else 2 * h_local) + tok * gathered, a),
        (tok, 4),                                   # rstd
        (tok * proj, a),                            # in_proj output (conv input view)
        (b * conv * (s + m["kernel"] - 1), a),      # left-padded conv input (channels first)
        (tok * conv, a),                            # conv output made contiguous (silu input)
        (tok * conv, a),                            # silu output: x, B, C
        (2 * b * H * c * q * q, f),                 # decay, scores (per head)
        (b * G * c * q * q, f),                     # C.B (per group)
        (6 * tok * di, f),                          # x dt, gated norm, out_proj input
        (2 * tok * H * N, f),                       # B, C with their decays, per head
        (2 * tok * G * N, f),                       # B, C operands of C.B
        ((2 * c + 1) * b * H * P * N, f),           # chunk states entering / carried
        (3 * tok * H + tok * G + b * H * c + 2 * H, f),  # dt, decay sums, norm rstd
        (q * q, 1),                                 # causal mask
    ]
    return _terms_bytes(terms)


def attention_activation_bytes(shape: ModelShape, L: Layout, s: int, b: int,
                               s_kv: Optional[int] = None) -> float:
    c, h, t = shape.llm, shape.llm["hidden_size"], L.tp
    return _attention_bytes(h, c["num_attention_heads"] / t, c["num_query_groups"] / t,
                            c["kv_channels"], L, s, b, s_kv or s, causal=True)


def _attention_bytes(h, nq, ng, kv, L: Layout, s, b, s_kv, causal: bool, sp: bool = None) -> float:
    a, tok = L.act_bytes, b * s
    sp = L.sequence_parallel if sp is None else sp
    h_local = h / L.tp if sp else h
    qkv = tok * (nq + 2 * ng) * kv
    if L.cp > 1 and L.cp_comm_type in ("all_gather", "a2a"):
        qkv += b * (s_kv - s) * 2 * ng * kv  # gathered keys and values of the other CP ranks
    if L.impl == "kernels":
        terms = [(2 * tok * h_local, a), (tok, 4), (qkv, a), (tok * nq * kv, a), (tok * nq, 4)]
    else:
        gathered = tok * h if sp else 0
        terms = [((2 if sp else 3) * tok * h_local + gathered, a), (tok, 4), (qkv, a),
                 (2 * tok * nq * kv, a), (tok * nq, 4)]
    if not L.flash and L.recompute != "selective":
        terms.append((2 * b * nq * s * s_kv, a))  # scores and probabilities
    return _terms_bytes(terms)


def mlp_activation_bytes(h: int, ffn: int, L: Layout, s: int, b: int, sp: bool = None) -> float:
    a, tok = L.act_bytes, b * s
    sp = L.sequence_parallel if sp is None else sp
    h_local = h / L.tp if sp else h
    if L.impl == "kernels":
        return _terms_bytes([(2 * tok * h_local, a), (tok, 4), (2 * tok * ffn / L.tp, a)])
    gathered = tok * h if sp else 0
    return _terms_bytes([((2 if sp else 3) * tok * h_local + gathered, a), (tok, 4),
                         (2 * tok * ffn / L.tp, a)])


def layer_activation_bytes(shape: ModelShape, L: Layout, kind: str, s: int, b: int) -> float:
    if kind == "M":
        return mamba_activation_bytes(shape, L, s, b)
    if kind == "*":
        return attention_activation_bytes(shape, L, s, b, s_kv=s * L.cp)
    return mlp_activation_bytes(shape.llm["hidden_size"], shape.llm["ffn_hidden_size"], L, s, b)


def layer_input_bytes(shape: ModelShape, L: Layout, s: int, b: int) -> float:
    h = shape.llm["hidden_size"]
    return b * s * (h / L.tp if L.sequence_parallel else h) * L.act_bytes


def logits_bytes(shape: ModelShape, L: Layout, s: int, b: int) -> float:
    """Output layer input + fp32 vocabulary-parallel softmax (+ labels, mask)."""
    h = shape.llm["hidden_size"]
    vocab = padded_vocab_size(shape.llm, L.tp) / L.tp
    h_in = h / L.tp if (L.sequence_parallel and L.impl == "kernels") else h
    final_norm = (2 * b * s * (h / L.tp if L.sequence_parallel else h)) * L.act_bytes + b * s * 4
    return final_norm + b * s * (h_in * L.act_bytes + vocab * 4 + 9)


def vision_tiles(shape: ModelShape, L: Layout) -> int:
    """Tiles in one micro-batch: the image share of the sequence, 1 tile per tokens_per_tile."""
    if shape.vision is None:
        return 0
    return int(L.micro_batch * L.seq_length * L.image_fraction) // shape.tokens_per_tile(L.tile_size)


def vit_layer_bytes(shape: ModelShape, L: Layout, tiles: int) -> float:
    v = shape.vision
    h, f, nq = v["hidden_size"], v["ffn_hidden_size"], v["num_attention_heads"] / L.tp
    tokens = (L.tile_size // v["patch_size"]) ** 2 + v["class_token_len"]
    tok, a = tiles * tokens, L.act_bytes
    if L.impl == "kernels":
        terms = [(4 * tok * h, a), (2 * tok, 4), (tok * 3 * h / L.tp + tok * h / L.tp, a),
                 (tok * nq, 4), (2 * tok * f / L.tp, a)]
    else:
        terms = [(5 * tok * h + 3 * tok * h / L.tp, a), (4 * tok, 4), (tok * nq, 4),
                 (2 * tok * f / L.tp, a)]
    if not L.flash and L.recompute != "selective":
        terms.append((2 * tiles * nq * tokens * tokens, a))
    return _terms_bytes(terms)


def vision_activation_bytes(shape: ModelShape, L: Layout, tiles: int) -> Dict[str, float]:
    """Vision tower + connector activations of one micro-batch (all on the first stage)."""
    if not tiles:
        return {"vision": 0.0, "connector": 0.0, "vision_transient": 0.0}
    v, a = shape.vision, L.act_bytes
    p = v["patch_size"]
    patches = tiles * (L.tile_size // p) ** 2
    per_layer = vit_layer_bytes(shape, L, tiles)
    tokens = (L.tile_size // p) ** 2 + v["class_token_len"]
    peak = 0.0  # one layer recomputed during the backward (full recompute)
    if "vision" in L.frozen:
        vision = 0.0  # runs under no_grad: nothing saved (its transients end before the LLM's)
    elif L.recompute == "full" and L.recompute_vision:
        vision = v["num_layers"] * tiles * tokens * v["hidden_size"] * a
        peak = per_layer
    else:
        vision = v["num_layers"] * per_layer
    if "vision" not in L.frozen:
        vision += patches * v["num_channels"] * p * p * a
    image_tokens = tiles * shape.tokens_per_tile(L.tile_size)
    merged = v["hidden_size"] * round(1 / shape.downsample_ratio) ** 2
    llm_h = shape.llm["hidden_size"]
    if "connector" in L.frozen and "vision" in L.frozen:
        connector = 0.0
    else:
        connector = _terms_bytes([(image_tokens * 3 * merged, a), (image_tokens, 4),
                                  (2 * image_tokens * shape.projector_hidden / L.tp, a),
                                  (image_tokens * llm_h, a), (image_tokens, 8)])
    return {"vision": vision, "connector": connector, "vision_transient": peak}


# ------------------------------------------------------------------------------------ plan

@dataclass
class StageMemory:
    stage: int
    layers: str
    weights: float
    grads: float
    optimizer: float
    activations: Dict[str, float]
    in_flight: int

    @property
    def activation_total(self) -> float:
        return sum(self.activations.values())

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activation_total


@dataclass
class Plan:
    shape: ModelShape
    layout: Layout
    hardware: Hardware
    params: Dict[str, int]
    stages: List[StageMemory]
    flops_per_token: Dict[str, float]
    efficiency: float
    step_seconds: float
    mfu: float
    suggestions: List[str] = field(default_factory=list)
    name: str = ""

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.hardware.memory_gb * GB

    def verdict(self) -> str:
        peak = self.peak
        head = (f"{'FITS' if self.fits else 'DOES NOT FIT'}: {peak.total / GB:.1f} GB on stage "
                f"{peak.stage} of {self.hardware.memory_gb:.0f} GB ({self.hardware.name})")
        if self.fits:
            return head
        if self.suggestions:
            return head + "; smallest change that fits: " + "; or ".join(self.suggestions)
        return head + "; no change tried fits"

    def report(self) -> str:
        L = self.layout
        lines = [f"# {self.name or 'plan'}: {L.describe()} on {L.gpus} x {self.hardware.name}, "
                 f"{L.microbatches} micro-batches/step, impl={L.impl}"]
        lines.append("parameters: " + ", ".join(f"{k} {v / 1e9:.4f}B" for k, v in self.params.items()))
        for st in self.stages:
            acts = ", ".join(f"{k} {v / GB:.2f}" for k, v in st.activations.items() if v)
            lines.append(f"stage {st.stage} ({st.layers}): weights {st.weights / GB:.2f} + grads "
                         f"{st.grads / GB:.2f} + optimizer {st.optimizer / GB:.2f} + activations "
                         f"{st.activation_total / GB:.2f} ({st.in_flight} micro-batches in flight: "
                         f"{acts}) = {st.total / GB:.2f} GB")
        f = self.flops_per_token
        lines.append("forward GFLOP/token: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f.items()))
        lines.append(f"step time {self.step_seconds:.1f} s at {self.efficiency:.0%} of "
                     f"{self.hardware.peak_tflops(L.precision):.0f} TFLOP/s peak, MFU {self.mfu:.1%} "
                     "(model FLOPs: 3x forward of trained parts, without recompute)")
        lines.append(self.verdict())
        return "\n".join(lines)


def stage_layer_split(pattern: str, pp: int) -> List[str]:
    """Layer symbols per pipeline stage (megatron's even split of the hybrid pattern)."""
    if len(pattern) % pp:
        raise ValueError(f"{len(pattern)} layers do not split evenly into {pp} pipeline stages")
    n = len(pattern) // pp
    return [pattern[i * n:(i + 1) * n] for i in range(pp)]


def _stage_memory(shape: ModelShape, L: Layout, stage: int, layers: str,
                  counts: Dict[str, PartParams]) -> StageMemory:
    first, last = stage == 0, stage == L.pp - 1
    # Parameters on this rank, split into trainable and frozen.
    per_rank: Dict[str, float] = {}
    for kind, name in (("M", "mamba"), ("*", "attention"), ("-", "mlp")):
        per_rank[name] = llm_layer_params(shape, kind).per_rank(L.tp) * layers.count(kind)
    if first:
        per_rank["embedding"] = counts["embedding"].per_rank(L.tp)
        for k in ("vision", "connector"):
            if k in counts:
                per_rank[k] = counts[k].per_rank(L.tp)
    if last:
        per_rank["final_norm"] = counts["final_norm"].per_rank(L.tp)
        per_rank["output_layer"] = counts["output_layer"].per_rank(L.tp)
    frozen = set(L.frozen)

    def is_frozen(name):
        return ("llm" in frozen and name in LLM_PARTS) or name in frozen

    trainable = sum(v for k, v in per_rank.items() if not is_frozen(k))
    total = sum(per_rank.values())
    w_bytes = 4 if L.precision == "fp32" else 2
    weights = total * w_bytes
    grads = trainable * 4  # megatron's grad buffers are fp32 (grad_reduce_in_fp32)
    opt_per_param = 8 if L.precision == "fp32" else 12  # (fp32 master +) Adam m, v
    shard = L.dp * L.cp if L.distributed_optimizer else 1
    optimizer = trainable * opt_per_param / shard

    s, b = L.seq_length // L.cp, L.micro_batch
    in_flight = min(L.pp - stage, L.microbatches) if L.pp > 1 else 1
    acts: Dict[str, float] = {}
    per_kind = {k: layer_activation_bytes(shape, L, k, s, b) for k in set(layers)}
    vision = None
    if first and shape.vision is not None:
        vision = vision_activation_bytes(shape, L, vision_tiles(shape, L))
    if L.recompute == "full":
        acts["layer inputs"] = in_flight * len(layers) * layer_input_bytes(shape, L, s, b)
        # the largest single layer lives again while its backward runs
        acts["recomputed layer"] = max(list(per_kind.values())
                                       + [vision.get("vision_transient", 0.0) if vision else 0.0])
    else:
        for kind, name in (("M", "mamba"), ("*", "attention"), ("-", "mlp")):
            if kind in per_kind:
                acts[name] = in_flight * layers.count(kind) * per_kind[kind]
    if vision is not None:
        acts["vision"] = in_flight * vision["vision"]
        acts["connector"] = in_flight * vision["connector"]
    if last:
        acts["logits"] = logits_bytes(shape, L, s, b)
    return StageMemory(stage, layers, weights, grads, optimizer, acts, in_flight)


def flops_per_token(shape: ModelShape, seq_length: int, tile_size: int = 512,
                    image_fraction: float = 0.5) -> Dict[str, float]:
    """Forward FLOPs per LLM token, per layer type (Megatron-LM's hybrid_flops terms)."""
    c, h = shape.llm, shape.llm["hidden_size"]
    m = shape.mamba_dims()
    pat = shape.pattern
    nq, ng, kv = c["num_attention_heads"], c["num_query_groups"], c["kv_channels"]
    out = {
        "mamba": pat.count("M") * (2 * h * m["in_proj"] + 7 * m["d_inner"] * m["state"]
                                   + 2 * m["d_inner"] * h),
        # projections + causal attention (each token attends to s/2 keys on average)
        "attention": pat.count("*") * (2 * h * (nq + 2 * ng) * kv + 2 * nq * kv * h
                                       + 2 * 2 * nq * kv * seq_length / 2),
        "mlp": pat.count("-") * 4 * h * c["ffn_hidden_size"],
        "logits": 2 * h * padded_vocab_size(c),
    }
    if shape.vision is not None:
        v = shape.vision
        vh, p = v["hidden_size"], v["patch_size"]
        patches = (tile_size // p) ** 2
        tokens = patches + v["class_token_len"]
        per_tile = patches * 2 * v["num_channels"] * p * p * vh + v["num_layers"] * tokens * (
            2 * 4 * vh * vh + 4 * vh * v["ffn_hidden_size"] + 4 * tokens * vh)
        per_image_token = 2 * (vh * 4 * shape.projector_hidden + shape.projector_hidden * h)
        tpt = shape.tokens_per_tile(tile_size)
        out["vision"] = image_fraction * per_tile / tpt
        out["connector"] = image_fraction * per_image_token
    return out


def _training_flops(fpt: Dict[str, float], L: Layout):
    """(executed, model) training FLOPs per token. A trainable part costs 3x its forward; a frozen
    part that gradients pass through (the LLM, the connector) 2x; a frozen vision tower, run under
    no_grad, 1x. Full recompute runs the recomputed parts' forward once more (executed only)."""
    executed = model = 0.0
    for part, flops in fpt.items():
        owner = part if part in ("vision", "connector") else "llm"
        if owner not in L.frozen:
            passes = 3
        else:
            passes = 1 if owner == "vision" else 2
        model += passes * flops
        recomputed = L.recompute == "full" and (owner == "llm" or (owner == "vision" and L.recompute_vision))
        executed += (passes + (1 if recomputed and passes > 1 else 0)) * flops
    return executed, model


def plan(shape: ModelShape, layout: Layout, hardware: Hardware, efficiency: float = 0.35,
         name: str = "", suggest: bool = True) -> Plan:
    L = layout
    _check_layout(shape, L)
    counts = parameter_counts(shape, L.tp)
    base = parameter_counts(shape, 1)
    params = {k: v.total for k, v in base.items()}
    params.update({f"[{k}]": v for k, v in part_totals(base).items()})
    stages = [_stage_memory(shape, L, i, layers, counts)
              for i, layers in enumerate(stage_layer_split(shape.pattern, L.pp))]
    fpt = flops_per_token(shape, L.seq_length, L.tile_size, L.image_fraction)
    executed, model = _training_flops(fpt, L)
    tokens = L.global_batch * L.seq_length
    peak = hardware.peak_tflops(L.precision) * 1e12
    step = executed * tokens / (L.gpus * peak * efficiency)
    mfu = model * tokens / (step * L.gpus * peak)
    result = Plan(shape, L, hardware, params, stages, fpt, efficiency, step, mfu, name=name)
    if suggest and not result.fits:
        result.suggestions = smallest_changes(shape, L, hardware, efficiency)
    return result


def _check_layout(shape: ModelShape, L: Layout) -> None:
    if L.recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {L.recompute!r} is not one of {RECOMPUTE_MODES}")
    if L.impl not in IMPLS:
        raise ValueError(f"impl {L.impl!r} is not one of {IMPLS}")
    if L.seq_length % L.cp:
        raise ValueError(f"seq_length {L.seq_length} is not divisible by cp={L.cp}")
    if L.dp < 1:
        raise ValueError("the GPU count is smaller than tp x pp x cp")


def smallest_changes(shape: ModelShape, L: Layout, hardware: Hardware,
                     efficiency: float = 0.35, limit: int = 3) -> List[str]:
    """Single changes, cheapest first, that make the layout fit: recompute, then more CP (fewer
    DP ranks, same GPU count), then more PP, then a smaller micro-batch, then combinations."""
    gpus = L.gpus
    candidates = []
    if L.recompute != "full":
        for mode in ("selective", "full"):
            if RECOMPUTE_MODES.index(mode) > RECOMPUTE_MODES.index(L.recompute):
                candidates.append((f"recompute {mode}", dict(recompute=mode)))
    for cp in (2, 4, 8, 16):
        if cp > L.cp and gpus % (L.tp * L.pp * cp) == 0 and L.seq_length % cp == 0:
            candidates.append((f"cp {cp}", dict(cp=cp, dp=gpus // (L.tp * L.pp * cp))))
    for pp in (2, 4, 8):
        if pp > L.pp and gpus % (L.tp * pp * L.cp) == 0 and len(shape.pattern) % pp == 0:
            candidates.append((f"pp {pp}", dict(pp=pp, dp=gpus // (L.tp * pp * L.cp))))
    if L.micro_batch > 1:
        candidates.append(("micro_batch 1", dict(micro_batch=1)))
    if L.recompute != "full":
        for cp in (2, 4, 8):
            if cp > L.cp and gpus % (L.tp * L.pp * cp) == 0:
                candidates.append((f"cp {cp} + recompute full",
                                   dict(cp=cp, dp=gpus // (L.tp * L.pp * cp), recompute="full")))
    found = []
    for label, change in candidates:
        trial = dataclasses.replace(L, **change)
        try:
            p = plan(shape, trial, hardware, efficiency, suggest=False)
        except ValueError:
            continue
        if p.fits:
            found.append(f"{label} ({p.peak.total / GB:.1f} GB, step {p.step_seconds:.1f} s)")
            if len(found) >= limit:
                break
    return found


# ------------------------------------------------------------------------------------ recipes

def _section(obj, name):
    return obj.get(name, {}) if isinstance(obj, dict) else getattr(obj, name, None)


def _key(section, key, default):
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(key, default)
    return getattr(section, key, default)


def layout_from_recipe(recipe, gpus: int, **overrides) -> Layout:
    """Layout of a loaded recipe (a Recipe, or its merged raw dict) on ``gpus`` GPUs.

    Keys other branches add (parallel.cp_comm_type, recompute.*) are read with defaults.
    ``overrides``: Layout fields (tp, pp, cp, recompute, micro_batch, ...); None keeps the recipe's.
    """
    par, train, data = _section(recipe, "parallel"), _section(recipe, "train"), _section(recipe, "data")
    rec, opt, model = _section(recipe, "recompute"), _section(recipe, "optimizer"), _section(recipe, "model")
    kw = dict(
        tp=_key(par, "tp", 1), pp=_key(par, "pp", 1), cp=_key(par, "cp", 1),
        sequence_parallel=_key(par, "sequence_parallel", False),
        cp_comm_type=_key(par, "cp_comm_type", "p2p"),
        seq_length=_key(data, "seq_length", 4096), tile_size=_key(data, "tile_size", 512),
        micro_batch=_key(train, "micro_batch_size", 1),
        global_batch=_key(train, "global_batch_size", 1),
        precision=_key(train, "precision", "bf16"),
        distributed_optimizer=_key(opt, "distributed", True),
        recompute=_key(rec, "mode", "none"), recompute_vision=_key(rec, "vision", True),
        frozen=tuple(_key(model, "freeze", ()) or ()),
    )
    kw.update({k: v for k, v in overrides.items() if v is not None})
    model_parallel = kw["tp"] * kw["pp"] * kw["cp"]
    if gpus % model_parallel:
        raise ValueError(f"{gpus} GPUs are not divisible by tp x pp x cp = {model_parallel}")
    kw["dp"] = gpus // model_parallel
    return Layout(**kw)


def load_recipe_any(path) -> object:
    """The validated Recipe, or (when this branch's validation does not know a section another
    branch added) the merged raw YAML dict."""
    from megatron_vlm.training.recipe import RecipeError, load_recipe, read_recipe_yaml

    try:
        return load_recipe(path)
    except RecipeError:
        return read_recipe_yaml(path)


def recipe_model_path(recipe, repo_root: Path) -> Path:
    cfg = _key(_section(recipe, "model"), "config", None)
    path = Path(cfg)
    return path if path.is_absolute() else repo_root / path


def plan_recipe(path, hardware: Hardware, gpus: int = 256, efficiency: float = 0.35,
                impl: str = "kernels", **overrides) -> Plan:
    repo_root = Path(__file__).resolve().parents[1]
    recipe = load_recipe_any(path)
    shape = ModelShape.load(recipe_model_path(recipe, repo_root))
    layout = layout_from_recipe(recipe, gpus, impl=impl, **overrides)
    return plan(shape, layout, hardware, efficiency, name=str(_key(recipe, "name", Path(path).stem)))
