"""The context-parallel split (one process): partition indices against hand-written ones, the
loader's per-sample padding, and the recipe checks for CP."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vlm.data.batch import check_batch, collate_rows
from megatron_vlm.data.packing import PackedItem, RowPacker
from megatron_vlm.data.prompt import EncodedSample
from megatron_vlm.models.context_parallel import check_mamba_cp_sizes, partition_index
from megatron_vlm.training.recipe import RecipeError, check_against_world, check_paths, load_recipe

REPO = Path(__file__).resolve().parents[2]


def test_partition_index_matches_hand_split():
    # Samples of 8, 4 and 4 tokens at cp=2: chunks of 2, 1, 1; rank r holds chunks r and 3-r.
    cu = torch.tensor([0, 8, 12, 16], dtype=torch.int32)
    assert partition_index(cu, 16, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 15]
    assert partition_index(cu, 16, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    # cp=3 on one sample of 12: chunks of 2; rank 1 holds chunks 1 and 4.
    assert partition_index(torch.tensor([0, 12]), 12, 3, 1).tolist() == [2, 3, 8, 9]
    every = torch.cat([partition_index(cu, 16, 2, r) for r in range(2)])
    assert sorted(every.tolist()) == list(range(16))  # a partition: each token on one rank
    with pytest.raises(ValueError, match="multiple of 2\\*cp=4"):
        partition_index(torch.tensor([0, 6, 16]), 16, 2, 0)


def _item(n: int, targets_from: int = 0) -> PackedItem:
    tokens = np.arange(10, 10 + n, dtype=np.int64)
    targets = np.zeros(n, dtype=bool)
    targets[targets_from:] = True
    return PackedItem(EncodedSample(tokens=tokens, targets=targets, tiles_per_media=[],
                                    last_media_token=-1), tiles=None, key=f"k{n}")


def test_loader_pads_every_sample_to_the_cp_multiple():
    packer = RowPacker(seq_length=32, pad_multiple=4)
    for n in (7, 10, 5, 9):  # occupy 8, 12, 8 (=28), then 12 does not fit: next row
        packer.add(_item(n))
    packer.close_row()
    assert [len(r) for r in packer.rows] == [3, 1]
    batch = collate_rows(packer.rows[:1], 32, pad_id=0, tile_size=8, pad_multiple=4)
    assert batch["cu_seqlens"].tolist() == [0, 8, 20, 28, 32]
    check_batch(batch, image_id=-1, tokens_per_tile=4)
    # the pad after a sample is in its segment, never a target; the sample's own targets are kept
    assert batch["loss_mask"][0, :8].tolist() == [1.0] * 6 + [0.0] * 2
    assert batch["tokens"][0, 7].item() == 0 and batch["position_ids"][0, 7].item() == 7
    assert batch["loss_mask"].sum().item() == (7 - 1) + (10 - 1) + (5 - 1)


def test_mamba_cp_rules():
    assert check_mamba_cp_sizes(128, 8, tp=8, cp=8) is None  # 12B at Stage 4: groups replicated
    assert check_mamba_cp_sizes(8, 2, tp=1, cp=2) is None  # tiny
    assert "heads" in check_mamba_cp_sizes(6, 2, tp=1, cp=4)
    assert "groups" in check_mamba_cp_sizes(12, 3, tp=1, cp=2)


_BAD_LLM = """
name: bad_heads
hybrid_override_pattern: "M*M-"
hidden_size: 128
ffn_hidden_size: 512
num_attention_heads: 4
num_query_groups: 2
kv_channels: 32
position_embedding_type: none
mamba_num_heads: 6
mamba_head_dim: 32
mamba_state_dim: 16
mamba_num_groups: 3
vocab_size: 4096
"""

BAD = {
    "mamba groups": ("parallel: {cp: 2}\nmodel: {config: bad_vlm.yaml}",
                     "parallel.cp=2: mamba groups per TP rank (3/tp=3) must be divisible by cp=2"),
    "sequence": ("parallel: {cp: 2}\ndata: {seq_length: 250}",
                 "data.seq_length=250 must be divisible by 2 x cp = 4 with parallel.cp=2"),
    "comm type": ("parallel: {cp: 2, cp_comm_type: ring}",
                  "parallel.cp_comm_type: must be one of ('p2p', 'all_gather', 'a2a')"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_cp_recipe_gives_one_line_error(workdir, monkeypatch, kind):
    """In-process, as ``megatron_vlm.train --validate-only`` runs it (its one-line printing of a
    RecipeError is tested in tests/training/test_recipes.py)."""
    body, message = BAD[kind]
    (workdir / "bad_llm.yaml").write_text(_BAD_LLM)
    (workdir / "bad_vlm.yaml").write_text(
        "name: bad_vlm\nlanguage_model: bad_llm.yaml\nvision_model: radio_tiny\n"
        "projector_hidden_size: 512\n")
    bad = workdir / "bad.yaml"
    bad.write_text(f"base: recipes/tiny/stage4.yaml\n{body}\n")
    monkeypatch.chdir(workdir)
    with pytest.raises(RecipeError) as err:
        recipe = load_recipe(bad)
        check_paths(recipe)
        check_against_world(recipe, 2)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{bad}: ") and message in text, text


def test_tiny_stage4_runs_at_cp2_and_validates(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    recipe = load_recipe(REPO / "recipes/tiny/stage4.yaml")
    check_paths(recipe)
    assert recipe.parallel.cp == 2 and check_against_world(recipe, 2) == 1
