"""Greedy decoding on a randomly initialised tiny VLM: consistency with one full forward, stop
tokens, the length limit, padded-vocabulary masking, and the sequence NLL against megatron's loss."""

import numpy as np
import pytest
import torch

from megatron_vlm.data.image import normalize_tiles
from megatron_vlm.evaluation.generate import forward_logits, greedy_generate, sequence_nll
from megatron_vlm.models.vlm import build_vlm

IMAGE_ID, TILE, PER_TILE, VOCAB = 7, 64, 4, 4096


@pytest.fixture(scope="module")
def model(megatron_single):
    torch.manual_seed(0)
    m = build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_ID, use_cpu_initialization=True)
    with torch.no_grad():  # sharper output distribution than the 0.02-std init: varied argmaxes
        m.language_model.output_layer.weight.mul_(40.0)
    return m.eval()


@pytest.fixture(scope="module")
def prompt():
    """Text, then one image of 2 tiles (uint8, as the shards hold them), then text."""
    g = np.random.default_rng(1)
    ids = g.integers(20, 3000, 12).tolist() + [IMAGE_ID] * (2 * PER_TILE) + g.integers(20, 3000, 9).tolist()
    tiles = g.integers(0, 256, (2, TILE, TILE, 3), dtype=np.uint8)
    return ids, tiles


def test_greedy_equals_argmax_of_one_full_forward(model, prompt):
    ids, tiles = prompt
    gen = greedy_generate(model, ids, tiles=tiles, max_new_tokens=10)
    assert gen.stop_reason == "length" and len(gen.tokens) == 10 and gen.forwards == 10
    assert len(set(gen.tokens)) > 1  # the check below is not trivially satisfied
    with torch.no_grad():
        full = model(torch.tensor([ids + gen.tokens]), tiles=normalize_tiles(tiles))[0]
    steps = full[len(ids) - 1: len(ids) - 1 + len(gen.tokens)]
    assert steps.argmax(-1).tolist() == gen.tokens
    # normalised float tiles give the same result as the shard's uint8 tiles
    again = greedy_generate(model, ids, tiles=normalize_tiles(tiles), max_new_tokens=10)
    assert again.tokens == gen.tokens


def test_images_matter(model, prompt):
    ids, tiles = prompt
    a = forward_logits(model, ids, tiles, last_only=True)
    b = forward_logits(model, ids, 255 - tiles, last_only=True)
    assert (a - b).abs().max().item() > 1e-4


def test_generation_stops_at_the_stop_token(model, prompt):
    ids, tiles = prompt
    free = greedy_generate(model, ids, tiles=tiles, max_new_tokens=10).tokens
    # the last token making its first appearance becomes "eos"
    j = max(k for k, t in enumerate(free) if t not in free[:k])
    gen = greedy_generate(model, ids, tiles=tiles, max_new_tokens=10, stop_ids={free[j]})
    assert gen.tokens == free[:j]
    assert gen.stop_reason == "stop_id" and gen.stop_token == free[j]
    assert gen.forwards == j + 1


def test_stop_fn_and_length(model, prompt):
    ids, tiles = prompt
    gen = greedy_generate(model, ids, tiles=tiles, max_new_tokens=10, stop_fn=lambda t: len(t) == 3)
    assert len(gen.tokens) == 3 and gen.stop_reason == "stop_fn"
    assert greedy_generate(model, ids, tiles=tiles, max_new_tokens=2).tokens == gen.tokens[:2]


def test_padded_vocabulary_is_never_generated(model, prompt):
    ids, tiles = prompt
    free = greedy_generate(model, ids, tiles=tiles, max_new_tokens=6).tokens
    limit = min(free)  # every unconstrained choice is at or above the limit
    limited = greedy_generate(model, ids, tiles=tiles, max_new_tokens=6, vocab_limit=limit).tokens
    assert all(t < limit for t in limited)
    logits = forward_logits(model, ids, tiles, vocab_limit=limit, last_only=True)
    assert torch.isinf(logits[limit:]).all() and torch.isfinite(logits[:limit]).all()


def test_sequence_nll_equals_megatron_loss(model, prompt):
    ids, tiles = prompt
    targets = [i >= len(ids) - 5 for i in range(len(ids))]  # the last 5 tokens are predicted
    total, count = sequence_nll(model, ids, targets=targets, tiles=tiles)
    tokens = torch.tensor([ids])
    labels = torch.roll(tokens, -1, dims=1)  # labels[i] = tokens[i + 1]
    with torch.no_grad():
        loss = model(tokens, tiles=normalize_tiles(tiles), labels=labels)[0]  # [s]
    expected = loss[len(ids) - 6: len(ids) - 1].sum().item()
    assert count == 5
    assert total == pytest.approx(expected, rel=1e-5)
    all_total, all_count = sequence_nll(model, ids, tiles=tiles)
    assert all_count == len(ids) - 1
    assert all_total == pytest.approx(loss[:-1].sum().item(), rel=1e-5)


# ---- incremental decoding (decode state per layer type) -------------------------------------

def test_cached_generation_equals_full_rerun_vlm(model, prompt):
    ids, tiles = prompt
    cached = greedy_generate(model, ids, tiles=tiles, max_new_tokens=16)
    rerun = greedy_generate(model, ids, tiles=tiles, max_new_tokens=16, use_cache=False)
    assert len(set(cached.tokens)) > 3
    assert cached.tokens == rerun.tokens and cached.forwards == rerun.forwards == 16


def test_cached_generation_equals_full_rerun_llm(model):
    """Text only, on the LLM alone, with a prompt longer than the SSD chunk (64)."""
    llm = model.language_model
    g = np.random.default_rng(3)
    ids = g.integers(20, 3000, 130).tolist()
    cached = greedy_generate(llm, ids, max_new_tokens=10)
    rerun = greedy_generate(llm, ids, max_new_tokens=10, use_cache=False)
    assert len(set(cached.tokens)) > 3 and cached.tokens == rerun.tokens


def test_decode_steps_match_full_forward_logits(model, prompt):
    from megatron_vlm.models.decode import IncrementalDecoder

    ids, tiles = prompt
    dec = IncrementalDecoder(model, capacity=len(ids) + 4)
    seq = torch.tensor([ids])
    logits = dec.prefill(seq, normalize_tiles(tiles))
    for token in (11, 2222, 345, 7):  # 7 is the image id: an ordinary token after the prompt
        with torch.no_grad():
            full = model(seq, tiles=normalize_tiles(tiles))[0, -1]
        assert torch.allclose(logits[0], full, atol=2e-5, rtol=1e-5)
        logits = dec.step(torch.tensor([token]))
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    with pytest.raises(ValueError, match="capacity"):
        dec.step(torch.tensor([1]))


def test_sampling_is_seeded_and_cache_independent(model, prompt):
    from megatron_vlm.evaluation.generate import sample_generate

    ids, tiles = prompt
    kw = dict(tiles=tiles, max_new_tokens=8, temperature=1.5, top_p=0.95, seed=5)
    a = sample_generate(model, ids, **kw).tokens
    assert a == sample_generate(model, ids, **kw).tokens
    assert a == sample_generate(model, ids, use_cache=False, **kw).tokens
    assert a != sample_generate(model, ids, **dict(kw, seed=6)).tokens
    greedy = greedy_generate(model, ids, tiles=tiles, max_new_tokens=8).tokens
    assert sample_generate(model, ids, tiles=tiles, max_new_tokens=8, top_k=1, seed=0).tokens == greedy


def test_ssd_step_equals_reference_recurrence():
    from megatron_vlm.models.decode import ssd_step
    from megatron_vlm.models.ssd_scan import ssd_reference_scan

    g = torch.Generator().manual_seed(0)
    b, L, h, p, grp, n = 2, 7, 4, 3, 2, 5
    x, B, C = torch.randn(b, L, h, p, generator=g), torch.randn(b, L, grp, n, generator=g), torch.randn(b, L, grp, n, generator=g)
    dt, A, D = torch.rand(b, L, h, generator=g), -torch.rand(h, generator=g), torch.randn(h, generator=g)
    want, final = ssd_reference_scan(x, dt, A, B, C, D)
    state = torch.zeros(b, h, p, n)
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(L)]
    assert torch.allclose(torch.stack(ys, 1).double(), want, atol=1e-5)
    assert torch.allclose(state.double(), final, atol=1e-5)


def test_uint8_tiles_are_normalised_in_the_model_exactly(model, prompt):
    ids, tiles = prompt
    with torch.no_grad():
        a = model(torch.tensor([ids]), tiles=torch.from_numpy(tiles))
        b = model(torch.tensor([ids]), tiles=normalize_tiles(tiles))
    assert torch.equal(a, b)
