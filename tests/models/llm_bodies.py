"""Bodies run under torchrun by test_llm_parallel.py: the tiny hybrid LLM, forward + backward.

The single-process reference perturbs the freshly initialised weights (so norms, D, biases are not
all ones/zeros and a wrong TP split of them would show), saves a megatron dist checkpoint, and
every other layout loads it. Two passes per run, each through megatron's pipeline schedule with
2 microbatches: plain [2, S] batches, and packed [1, 2S] 'thd' batches (several samples each).
Returned: mean loss and per-parameter gradient norms keyed by global (layout-independent) names.
"""

from __future__ import annotations

import torch

from megatron_vlm.distributed import initialize_distributed
from tests.parallel_utils import load_checkpoint, save_checkpoint

MODEL = "nemotron_h_tiny"
SEQ, MBS, NUM_MB = 160, 2, 2
# Packed samples per microbatch (cumulative lengths over 2*SEQ tokens); the tail is pack padding.
PACKED_CU = [[0, 50, 51, 190, 300], [0, 120, 200, 320]]


def _batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (NUM_MB, MBS, SEQ + 1), generator=g)
    plain = [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens]
    packed = [{"tokens": t[:, :-1].reshape(1, -1), "labels": t[:, 1:].reshape(1, -1),
               "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
              for t, cu in zip(tokens, PACKED_CU)]
    return plain, packed


def _loss(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    from megatron_vlm.models.packing import make_packed_seq_params

    batch = next(data_iterator)
    psp = make_packed_seq_params(batch["cu_seqlens"]) if "cu_seqlens" in batch else None
    out = model(batch["tokens"], None, None, labels=batch["labels"], packed_seq_params=psp)
    return out, _loss


def _global_name(model, name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _grad_norms(model) -> dict:
    """Squared grad norm of every full (unsharded) parameter, gathered on all ranks."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    local = {}
    for name, p in model.named_parameters():
        grad = torch.zeros(1) if p.grad is None else p.grad.double()
        if getattr(p, "sequence_parallel", False) and tp_group.size() > 1:
            # With sequence parallelism each rank holds the gradient of its sequence shard only;
            # megatron's finalize_model_grads sums them over TP, as done here.
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=tp_group)
        sq = grad.pow(2).sum().view(1)
        if getattr(p, "tensor_model_parallel", False):
            torch.distributed.all_reduce(sq, group=tp_group)  # TP shards partition the tensor
        local[_global_name(model, name)] = sq.item()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    merged = {}
    for d in gathered:
        merged.update(d)
    return {k: v ** 0.5 for k, v in merged.items()}


def _run_pass(model, batches, seq_length, micro_batch_size):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False)
    loss = torch.zeros(1, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss[0] = torch.stack([d["loss"].double() for d in losses]).mean()
    torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    norms = _grad_norms(model)
    return {"loss": loss.item(), "grad_norms": norms,
            "total_grad_norm": sum(v * v for v in norms.values()) ** 0.5}


@torch.no_grad()
def _perturb(model):
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if name.endswith(("layer_norm_weight", "norm.weight", ".D")):
            p.add_(0.3 * noise)
        elif name.endswith(("conv1d.bias", "dt_bias", "A_log")):
            p.add_(0.2 * noise)


def run_layout(ckpt: str, tp: int = 1, pp: int = 1, sp: bool = False, save: bool = False) -> dict:
    """Forward+backward at the given layout from the checkpoint (``save``: write it first)."""
    from megatron_vlm.models.config import load_model_config
    from megatron_vlm.models.llm import build_hybrid_llm

    initialize_distributed(tp=tp, pp=pp)
    model = build_hybrid_llm(MODEL, use_cpu_initialization=True, sequence_parallel=sp)
    if save:
        _perturb(model)
        save_checkpoint(model, ckpt)
    load_checkpoint(model, ckpt)
    model.eval()  # dropout is 0 anyway; eval makes it explicit
    plain, packed = _batches(load_model_config(MODEL)["vocab_size"])
    return {"plain": _run_pass(model, plain, SEQ, MBS),
            "packed": _run_pass(model, packed, MBS * SEQ, 1)}
