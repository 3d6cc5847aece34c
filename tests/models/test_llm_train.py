"""The tiny hybrid LLM trains on CPU in fp32 through the automatically selected (local) spec."""

import torch


def test_auto_spec_is_local_on_cpu_and_te_spec_uses_te_slots():
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
    )

    from megatron_vlm.models.hybrid_specs import get_hybrid_stack_spec, resolved_impl
    from megatron_vlm.models.norms import NormColumnParallelLinear

    assert not torch.cuda.is_available() and resolved_impl("auto") == "local"
    local, te = get_hybrid_stack_spec("local"), get_hybrid_stack_spec("te")
    mixer = lambda s: s.submodules.mamba_layer.submodules.mixer  # noqa: E731
    attn = lambda s: s.submodules.attention_layer.submodules.self_attention.submodules  # noqa: E731
    assert mixer(local).module is mixer(te).module  # one mixer class for both
    assert mixer(local).submodules.in_proj is NormColumnParallelLinear
    assert mixer(te).submodules.in_proj is TELayerNormColumnParallelLinear
    assert attn(te).core_attention is TEDotProductAttention and te.submodules.final_norm is TENorm


def test_tiny_model_trains(megatron_single):
    from megatron_vlm.models.llm import build_hybrid_llm

    torch.manual_seed(0)
    model = build_hybrid_llm("nemotron_h_tiny")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 4096, (2, 129), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], None, None, labels=ids[:, 1:]).mean()
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert not no_grad, no_grad
        opt.step()
        losses.append(loss.item())
    print("losses", [round(x, 3) for x in losses])
    assert losses[0] > 8.0 and losses[-1] < losses[0] - 2.0
