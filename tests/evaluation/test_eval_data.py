"""Eval samples are what training sees: prompts are prefixes of the training tokens, tiles are the
training batch's tiles; raw records tiled without shards give the same; code prompts and answers."""

import json

import numpy as np
import pytest
import torch

from megatron_vlm.data_prep.records import tile_record
from megatron_vlm.data.image import normalize_tiles
from megatron_vlm.data.loader import DatasetSpec, PackedVLMLoader
from megatron_vlm.data.prompt import PromptEncoder
from megatron_vlm.data.tokenizer import VLMTokenizer
from megatron_vlm.evaluation.tasks import (
    EvalDataError,
    _chat_from_raw,
    find_data_root,
    load_task_samples,
)
from megatron_vlm.training.recipe import load_recipe
from tests.evaluation.conftest import REPO

TILE, PER_TILE = 64, 4


@pytest.fixture(scope="module")
def tok(eval_demo_data):
    return VLMTokenizer.from_pretrained(eval_demo_data / "tokenizer")


@pytest.fixture(scope="module")
def enc(tok):
    return PromptEncoder(tok, PER_TILE)


def _raw(demo, task):
    return [json.loads(x) for x in (demo / "raw" / task / "eval.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["ocr", "multi_image"])
def test_image_samples_match_the_training_batches(eval_demo_data, tok, enc, task):
    samples = load_task_samples(task, eval_demo_data, enc, TILE, limit=3)
    assert len(samples) == 3
    raw = _raw(eval_demo_data, task)
    loader = PackedVLMLoader([DatasetSpec(task, str(eval_demo_data / "shards" / task / "eval"))], tok,
                             seq_length=2048, micro_batch_size=1, tile_size=TILE, patch_size=16,
                             shuffle=False, num_epochs=1)
    batch = next(loader)
    loader.close()
    tokens, tiles = batch["tokens"][0], batch["tiles"]
    start, tile_at = 0, 0
    for sample, record in zip(samples, raw):
        assert sample.id == record["id"] and sample.answer == record["answer"]
        n = len(sample.prompt_ids)
        # the prompt is the training sample up to the assistant's answer
        assert tokens[start:start + n].tolist() == sample.prompt_ids
        answer_ids = enc.encode_plain(record["answer"])
        assert tokens[start + n:start + n + len(answer_ids)].tolist() == answer_ids
        k = sample.tiles.shape[0]
        assert torch.equal(tiles[tile_at:tile_at + k], normalize_tiles(sample.tiles))
        assert sample.prompt_ids.count(tok.image_id) == k * PER_TILE
        tile_at += k
        # next packed sample: its boundary in cu_seqlens
        bounds = batch["cu_seqlens"].tolist()
        start = next(b for b in bounds if b > start)
    if task == "multi_image":
        assert all(s.tiles.shape[0] >= 2 for s in samples)


def test_raw_records_tiled_like_the_shards(eval_demo_data, enc):
    from_shards = load_task_samples("ocr", eval_demo_data, enc, TILE, limit=4)
    from_raw = _chat_from_raw("ocr", eval_demo_data, enc, TILE, limit=4, record_builder=tile_record)
    for a, b in zip(from_shards, from_raw):
        assert (a.id, a.prompt_ids, a.answer, a.ref_tokens) == (b.id, b.prompt_ids, b.answer, b.ref_tokens)
        assert np.array_equal(a.tiles, b.tiles)


def test_text_and_needle_samples(eval_demo_data, enc):
    for task in ("text", "needle"):
        samples = load_task_samples(task, eval_demo_data, enc, TILE, limit=50)
        raw = _raw(eval_demo_data, task)
        assert [s.answer for s in samples] == [r["answer"] for r in raw]
        assert all(s.tiles is None for s in samples)
    # a correct answer needs the answer tokens, the newline and eos
    needle = load_task_samples("needle", eval_demo_data, enc, TILE, limit=1)[0]
    assert needle.ref_tokens == len(enc.encode_plain(needle.answer)) + 2


def test_code_samples(eval_demo_data, enc, tok):
    samples = load_task_samples("code", eval_demo_data, enc, TILE, limit=3)
    for s, record in zip(samples, _raw(eval_demo_data, "code")):
        assert s.answer == record["answer"]
        assert s.prompt_text + s.tail == record["prefix"] and not s.prompt_text[-1:].isspace()
        assert tok.decode(s.prompt_ids) == s.prompt_text
        # the prompt's tokens begin the document exactly as training tokenizes it
        assert s.document == enc.encode_text(record["text"]).tokens.tolist()
        assert s.document[:len(s.prompt_ids)] == s.prompt_ids
        assert record["text"].startswith(record["prefix"] + record["answer"])


def test_limit_unknown_task_and_data_root(eval_demo_data, enc, tmp_path):
    assert len(load_task_samples("ocr", eval_demo_data, enc, TILE, limit=2)) == 2
    with pytest.raises(EvalDataError, match="unknown eval task"):
        load_task_samples("ocrr", eval_demo_data, enc, TILE)
    with pytest.raises(EvalDataError, match="no eval data"):
        load_task_samples("chart", eval_demo_data, enc, TILE)  # not generated for these tests
    with pytest.raises(EvalDataError, match="px tiles"):
        load_task_samples("ocr", eval_demo_data, enc, 128)
    for stage in ("base", "stage0", "stage2", "stage4"):
        recipe = load_recipe(REPO / "recipes" / "tiny" / f"{stage}.yaml")
        assert str(find_data_root(recipe)) == "demo_data"
