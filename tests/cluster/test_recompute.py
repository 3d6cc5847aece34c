"""Activation recompute changes memory, not numbers: full and selective match none (fp32)."""

import pytest
import torch

from tests.vision.bodies import microbatches
from tests.vision.reference import IMAGE_TOKEN_ID

TOL = 1e-6
MODES = {
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 2},
    "full_block": {"recompute_granularity": "full", "recompute_method": "block",
                   "recompute_num_layers": 3},
}


def loss_and_grads(overrides: dict, state: dict):
    from megatron_vlm.models.vlm import build_vlm

    model = build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                      use_cpu_initialization=True, **overrides)
    model.load_state_dict(state)
    model.train()
    calls = {"layers": 0, "core_attn": 0}

    def counter(key):
        return lambda *a: calls.__setitem__(key, calls[key] + 1)

    # count forward calls: recompute runs layers (full) / attention cores (selective) again in
    # the backward pass
    hooks = [m.register_forward_hook(counter("layers")) for m in model.modules()
             if type(m).__name__ in ("MambaLayer", "TransformerLayer")]
    hooks += [m.register_forward_hook(counter("core_attn")) for m in model.modules()
              if type(m).__name__ == "LocalCoreAttention"]
    total = 0.0
    torch.manual_seed(1)  # the tower's training-time position-embedding crops are random
    for batch in microbatches():
        loss = model(batch["tokens"], tiles=batch["tiles"], labels=batch["labels"])
        loss = (loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        total += loss.item()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return total, grads, calls, model


def test_recompute_matches_no_recompute(megatron_single):
    from megatron_vlm.models.vlm import build_vlm

    torch.manual_seed(0)
    state = build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                      use_cpu_initialization=True).state_dict()
    ref_loss, ref_grads, ref_calls, ref_model = loss_and_grads({}, state)
    assert ref_model.language_model.config.recompute_granularity is None
    for name, overrides in MODES.items():
        loss, grads, calls, model = loss_and_grads(overrides, state)
        worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
        print(f"{name}: loss {loss:.8f} (none {ref_loss:.8f}), max grad diff {worst:.3g}, "
              f"layer calls {calls} (none {ref_calls})")
        assert abs(loss - ref_loss) <= TOL
        assert worst <= TOL
        config = model.language_model.config
        assert config.recompute_granularity == overrides["recompute_granularity"]
        if overrides["recompute_granularity"] == "full":
            # the layers really ran twice (LLM: our HybridStack; vision: TransformerBlock)
            assert calls["layers"] > ref_calls["layers"], (name, calls, ref_calls)
        else:
            assert calls["core_attn"] == 2 * ref_calls["core_attn"], (name, calls, ref_calls)
            assert calls["layers"] == ref_calls["layers"]
        assert model.vision_model.config.recompute_granularity == overrides["recompute_granularity"]


def test_vision_recompute_can_be_left_off(megatron_single):
    from megatron_vlm.models.vlm import build_vlm

    model = build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                      use_cpu_initialization=True, vision_recompute=False, **MODES["full_uniform"])
    assert model.language_model.config.recompute_granularity == "full"
    assert model.vision_model.config.recompute_granularity is None
