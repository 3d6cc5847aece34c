"""Numerical parity of the megatron hybrid LLM with transformers' NemotronHForCausalLM (CPU, fp32).

Both models get the same random weights through megatron_vlm.conversion.hf_mapping_llm. Weights are
drawn so that nothing is at its trivial init (norm weights != 1, D != 1, ...), otherwise a mapping
mistake on those tensors would go unnoticed.
"""

import pytest
import torch

from megatron_vlm.models.config import load_model_config
from megatron_vlm.conversion.hf_mapping_llm import hf_config_kwargs, hf_to_megatron, megatron_to_hf

SEQ = 333  # 5 full SSD chunks of 64 plus a partial one
TOL = 1e-4


@pytest.fixture(scope="module")
def models(megatron_single):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from megatron_vlm.models.llm import build_hybrid_llm

    cfg = load_model_config("nemotron_h_tiny")
    cfg["mamba_dt_clamp_min"] = 0.001  # transformers clamps dt at time_step_min
    assert SEQ > 4 * cfg["mamba_chunk_size"]
    torch.manual_seed(0)
    hf_cfg = NemotronHConfig(**hf_config_kwargs(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = NemotronHForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.2 * r)
            elif name.endswith(".D"):
                p.copy_(r)
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 3 - 2)
            elif name.endswith("dt_bias"):
                p.copy_(r - 2)
            elif name.endswith("conv1d.bias"):
                p.copy_(0.1 * r)
            elif name.endswith("conv1d.weight"):
                p.copy_(0.3 * r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)
    mg = build_hybrid_llm(cfg).eval()
    missing, unexpected = mg.load_state_dict(hf_to_megatron(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return cfg, hf, mg


def _tokens(batch, seq, seed=2):
    return torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_mapping_round_trip(models):
    cfg, hf, mg = models
    back = megatron_to_hf(mg.state_dict(), cfg)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for k, v in ref.items():
        assert torch.equal(back[k], v), k


@torch.no_grad()
def test_logits_match_transformers(models):
    cfg, hf, mg = models
    ids = _tokens(2, SEQ)
    ref = hf(input_ids=ids, use_cache=False).logits
    out = mg(ids, None, None)
    assert out.shape == ref.shape == (2, SEQ, 4096)
    diff = (out - ref).abs().max().item()
    print(f"max |logits diff| = {diff:.3g} (max |logit| {ref.abs().max().item():.3g})")
    assert diff <= TOL
    assert ref.std() > 0.5  # logits are not trivially small


@torch.no_grad()
def test_decoder_input_path_matches_input_ids(models):
    """The VLM passes embeddings: model.embedding(...) as decoder_input gives the same logits."""
    _, _, mg = models
    ids = _tokens(2, 64, seed=3)
    emb = mg.embedding(input_ids=ids, position_ids=None)  # [s, b, h]
    torch.testing.assert_close(mg(None, None, None, decoder_input=emb), mg(ids, None, None))


@torch.no_grad()
def test_packed_sequences_match_separate_transformers_runs(models):
    """One packed [1, T] row == each sample run alone through transformers (attention, conv and
    SSM state all reset at boundaries; a trailing pack-padding segment too)."""
    from megatron_vlm.models.packing import make_packed_seq_params

    _, hf, mg = models
    lengths = [150, 1, 70, 200, 29]  # the last one plays pack padding (after cu_seqlens[-1])
    ids = _tokens(1, sum(lengths), seed=4)
    cu = torch.tensor([0] + lengths[:-1]).cumsum(0)
    out = mg(ids, None, None, packed_seq_params=make_packed_seq_params(cu))
    start, worst = 0, 0.0
    for n in lengths:
        ref = hf(input_ids=ids[:, start:start + n], use_cache=False).logits
        worst = max(worst, (out[:, start:start + n] - ref).abs().max().item())
        start += n
    print(f"packed vs separate: max |logits diff| = {worst:.3g}")
    assert worst <= TOL
    # Without packing the same row gives different logits after the first sample.
    plain = mg(ids, None, None)
    assert (plain[:, lengths[0]:] - out[:, lengths[0]:]).abs().max() > 0.1


@torch.no_grad()
def test_packed_batch_rows(models):
    """cu_seqlens over the flattened [b, s] grid (local spec, b > 1) equals the b = 1 pack."""
    from megatron_vlm.models.packing import make_packed_seq_params

    _, _, mg = models
    ids = _tokens(2, 100, seed=5)
    cu = torch.tensor([0, 30, 100, 160])  # the second row holds samples [100,160) and [160,200)
    two_rows = mg(ids, None, None, packed_seq_params=make_packed_seq_params(cu, qkv_format="sbhd"))
    one_row = mg(ids.reshape(1, 200), None, None,
                 packed_seq_params=make_packed_seq_params(torch.tensor([0, 30, 100, 160])))
    torch.testing.assert_close(two_rows.reshape(1, 200, -1), one_row, rtol=1e-5, atol=1e-5)
