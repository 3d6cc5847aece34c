"""Evaluation on eval shards of one's own: ANLS on known strings, task specs, references from the
record's ``answer`` or the last assistant turn, and exact-match / ANLS counts of a real (randomly
initialised) tiny VLM on generated shards whose references are built from its own outputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vlm.data_prep.build_shards import build_shards
from megatron_vlm.data_prep.train_tokenizer import train_bpe
from megatron_vlm.data.prompt import PromptEncoder
from megatron_vlm.data.tiling import TilingConfig, tokens_per_tile
from megatron_vlm.evaluation.tasks import (
    EvalDataError,
    anls,
    evaluate_tasks,
    exact_match,
    is_shard_spec,
    levenshtein,
    load_shard_samples,
    normalize,
    score_sample,
    shard_eval_set,
)

TILE = 64
PER_TILE = tokens_per_tile(TILE, 16, 0.5)  # vlm_tiny: patch 16, pixel shuffle 0.5 -> 4


def test_levenshtein_and_anls_of_known_strings():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2 and levenshtein("same", "same") == 0
    assert anls("hallo", "hello") == pytest.approx(0.8)                 # 1 substitution in 5
    assert anls("kitten", "sitting") == pytest.approx(1 - 3 / 7)        # 0.571
    assert anls(" Hello   WORLD ", "hello world") == 1.0               # normalised first
    assert anls("abcd", "abxy") == 0.0                                  # distance 0.5: at the threshold
    assert anls("abc", "xyz") == 0.0 and anls(None, "x") == 0.0
    # several accepted references: the best one counts
    assert score_sample("anls", "cats", ["dog", "cat"]) == pytest.approx(0.75)
    assert score_sample("exact", "Dog", ["dog", "cat"]) == 1.0
    assert score_sample("exact", "cow", ["dog", "cat"]) == 0.0


def test_task_specs():
    assert shard_eval_set("mine=data/x/eval") == shard_eval_set("mine=data/x/eval")
    assert (shard_eval_set("mine=data/x/eval").name, shard_eval_set("mine=data/x/eval").path) == ("mine", "data/x/eval")
    assert shard_eval_set("my_data/shards/eval").name == "my_data"
    assert shard_eval_set("/abs/docvqa/eval").name == "docvqa"
    assert is_shard_spec("my_data/shards/eval") and is_shard_spec("a=b") and not is_shard_spec("ocr")


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48 + 16 * seed, 80, 3), dtype=np.uint8)).save(path)


def _write_set(root, answers: list) -> str:
    """One image question per answer; answer None: no 'answer' field (the last turn is the reference)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, answer in enumerate(answers):
        _image(root / "img" / f"{i}.png", i)
        record = {"id": f"q{i}", "images": [f"img/{i}.png"], "messages": [
            {"role": "system", "content": "/think" if i % 2 else "/no_think"},
            {"role": "user", "content": f"<image>\nwhat is shown {i}"},
            {"role": "assistant", "content": "red"}]}
        if i % 2:  # with reasoning on, a reasoning trace keeps the prompt a prefix of the target
            record["messages"][-1]["reasoning"] = "r"
        if answer is not None:
            record["answer"] = answer
        lines.append(json.dumps(record))
    (root / "eval.jsonl").write_text("\n".join(lines) + "\n")
    build_shards(str(root / "eval.jsonl"), str(root / "shards"), tiling=TilingConfig(TILE, 1, 2, True),
                 log=lambda m: None)
    return str(root / "shards")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["what is shown red green blue cat dog the a picture of"] * 20, vocab_size=300)


def test_references_and_errors(tmp_path, tokenizer):
    enc = PromptEncoder(tokenizer, PER_TILE)
    shards = _write_set(tmp_path / "a", ["blue", ["cat", "a cat"], None])
    samples = load_shard_samples(shard_eval_set(f"mine={shards}"), enc, TILE, limit=None)
    assert [s.answer for s in samples] == ["blue", ["cat", "a cat"], "red"]
    assert [s.tiles.shape[0] for s in samples] == [3, 1, 1]  # 80x48: 2x1 + thumbnail; 80x64, 80x80: 1x1
    assert all(s.prompt_ids.count(tokenizer.image_id) == s.tiles.shape[0] * PER_TILE for s in samples)
    assert len(load_shard_samples(shard_eval_set(shards), enc, TILE, limit=2)) == 2
    with pytest.raises(EvalDataError, match="does not exist"):
        load_shard_samples(shard_eval_set(str(tmp_path / "nowhere")), enc, TILE)
    with pytest.raises(EvalDataError, match="px tiles"):
        load_shard_samples(shard_eval_set(shards), enc, 128)


@pytest.fixture(scope="module")
def model(megatron_single, tokenizer):
    from megatron.core import tensor_parallel

    from megatron_vlm.models.vlm import build_vlm

    # Both generators: megatron's tracker state otherwise depends on the tests run before.
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    m = build_vlm("vlm_tiny", impl="local", image_token_id=tokenizer.image_id,
                  img_end_token_id=tokenizer.img_end_id, use_cpu_initialization=True)
    with torch.no_grad():  # sharper output distribution than the 0.02-std init: varied argmaxes
        m.language_model.output_layer.weight.mul_(40.0)
    return m.eval()


def test_exact_match_and_anls_counts_on_generated_shards(tmp_path, tokenizer, model):
    # Every reference is short, so each sample's generation budget is max_new_tokens (8) whatever
    # its reference: the model's outputs do not depend on the references.
    kw = dict(tile_size=TILE, tokens_per_tile=PER_TILE, limit=None, max_new_tokens=8, slack=8)
    first = _write_set(tmp_path / "first", ["x"] * 6)
    scores, (result,) = evaluate_tasks(model, tokenizer, [f"mine={first}"], tmp_path, **kw)
    outputs = [p["prediction"] for p in result.predictions]
    # (a random tiny model's output hardly depends on the image; the think switch changes the
    # prompt's last tokens, so the two halves differ)
    assert len(set(outputs)) > 1 and all(len(normalize(o)) >= 2 for o in outputs), outputs
    assert scores == {"mine_acc": 0.0, "mine_anls": scores["mine_anls"]}
    # Now the references: the output itself for 3 samples (re-spaced and upper-cased: normalised
    # away), one character more for 2 (ANLS 1 - 1/(n+1)), something unrelated for 1.
    references = [outputs[0].upper(), " ".join(outputs[1].split()) + " ", outputs[2],
                  outputs[3] + "#", [outputs[4] + "#", "unrelated"], "~" * 40]
    second = _write_set(tmp_path / "second", references)
    scores, (result,) = evaluate_tasks(model, tokenizer, [second], tmp_path, **kw)
    assert [p["prediction"] for p in result.predictions] == outputs
    assert [p["correct"] for p in result.predictions] == [True, True, True, False, False, False]
    assert scores["second_acc"] == 0.5
    near = [1 - 1 / (len(normalize(o)) + 1) for o in outputs[3:5]]
    assert scores["second_anls"] == pytest.approx((3 + sum(near)) / 6)
    assert sum(exact_match(o, r) for o, r in zip(outputs[:3], references[:3])) == 3
