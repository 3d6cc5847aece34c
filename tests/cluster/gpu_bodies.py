"""Bodies of the GPU tests (tests/cluster/test_gpu.py), run under torchrun on CUDA."""

from __future__ import annotations

import torch

from tests.vision.bodies import SEQ, microbatches
from tests.vision.reference import IMAGE_TOKEN_ID


def _batches_on_gpu():
    out = []
    for b in microbatches():
        out.append({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
    return out


def te_vs_local() -> dict:
    """The tiny VLM with TransformerEngine layers and with the local layers, same weights, bf16."""
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.models.vlm import build_vlm

    initialize_distributed()
    torch.manual_seed(0)
    kwargs = dict(image_token_id=IMAGE_TOKEN_ID, params_dtype=torch.bfloat16, bf16=True)
    local = build_vlm("vlm_tiny", impl="local", **kwargs).cuda().eval()
    te = build_vlm("vlm_tiny", impl="te", **kwargs).cuda().eval()
    state = {k: v for k, v in local.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = te.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    losses = {}
    with torch.no_grad():
        for name, model in (("local", local), ("te", te)):
            total = 0.0
            for b in _batches_on_gpu():
                per_token = model(b["tokens"], tiles=b["tiles"], labels=b["labels"]).float()
                total += (per_token * b["loss_mask"]).sum().item() / b["loss_mask"].sum().item()
            losses[name] = total / len(microbatches())
    return {"losses": losses, "missing": missing, "unexpected": list(unexpected)}


def mamba_kernels_vs_scan() -> dict:
    """mamba-ssm / causal-conv1d kernels against our torch conv and SSD scan, on the GPU, fp32."""
    from megatron_vlm.models import mamba_ops

    assert mamba_ops._kernel_ssd is not None and mamba_ops._kernel_conv1d is not None, \
        "mamba-ssm / causal-conv1d are not importable"
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, groups, n, chunk = 2, 192, 4, 16, 2, 16, 64

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    x, dt, dt_bias = rnd(b, l, h, p), rnd(b, l, h, scale=0.5), rnd(h, scale=0.1)
    A, B, C, D = -torch.rand(h, device="cuda", generator=g) - 0.5, rnd(b, l, groups, n), \
        rnd(b, l, groups, n), rnd(h)
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq_idx[:, 70:] = 1
    seq_idx[:, 150:] = 2
    conv_x, conv_w, conv_b = rnd(b, l, 64), rnd(64, 4, scale=0.5), rnd(64, scale=0.1)
    out = {}
    for packed in (False, True):
        ids = seq_idx if packed else None
        mamba_ops.ALLOW_KERNELS = True
        y_kernel = mamba_ops.ssd(x, dt, dt_bias, A, B, C, D, chunk, seq_idx=ids)
        c_kernel = mamba_ops.causal_conv1d_silu(conv_x, conv_w, conv_b, seq_idx=ids)
        mamba_ops.ALLOW_KERNELS = False
        y_torch = mamba_ops.ssd(x, dt, dt_bias, A, B, C, D, chunk, seq_idx=ids)
        c_torch = mamba_ops.causal_conv1d_silu(conv_x, conv_w, conv_b, seq_idx=ids)
        mamba_ops.ALLOW_KERNELS = True
        key = "packed" if packed else "plain"
        out[f"ssd_{key}"] = ((y_kernel.float() - y_torch.float()).abs().max().item(),
                             y_torch.abs().max().item())
        out[f"conv_{key}"] = ((c_kernel - c_torch).abs().max().item(), c_torch.abs().max().item())
    return out
