import json
import os

import numpy as np
from PIL import Image

from megatron_vlm.data_prep.make_demo_data import TASKS, make_demo_data
from megatron_vlm.data.batch import check_batch
from megatron_vlm.data.loader import DatasetSpec, PackedVLMLoader
from megatron_vlm.data.prompt import PromptEncoder
from megatron_vlm.data.tiling import TilingConfig, tokens_per_tile
from megatron_vlm.data.tokenizer import VLMTokenizer
from megatron_vlm.data.video import VideoOptions


def test_demo_corpus_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    info = make_demo_data(out, seed=3, scale=0.02, tiling=TilingConfig(64, 1, 6, True), vocab_size=1000,
                          needle_words=(60, 120), log=lambda m: None)
    assert set(info["datasets"]) == set(TASKS)
    assert json.load(open(os.path.join(out, "datasets.json"))) == info
    tok = VLMTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert tok.vocab_size == info["vocab_size"] <= 1000 and tok.added_tokens == ()
    encoder = PromptEncoder(tok, 4)
    for task, d in info["datasets"].items():
        n_train, n_eval, _ = TASKS[task]
        assert d["num_train"] == max(1, round(n_train * 0.02)) and d["num_eval"] == max(1, round(n_eval * 0.02))
        evals = [json.loads(line) for line in open(os.path.join(out, d["eval_jsonl"]))]
        assert len(evals) == d["num_eval"] and all(r["answer"] for r in evals)
        train = [json.loads(line) for line in open(os.path.join(out, "raw", task, "train.jsonl"))]
        if task == "code":
            assert all(r["prefix"] + r["answer"] in r["text"] for r in evals)
            assert all(".py:" in r["source"] and len(r["text"]) >= 200 for r in train)  # stdlib sources
            continue
        for r in evals:  # the reference answer is the last assistant turn; a prompt can be built from it
            assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
            media = [{"type": "image", "tiles": ["x"], "grid": [1, 1]}] * len(r.get("images", []))
            media += [{"type": "video", "frames": [{"t": 0.5 * k} for k in range(4)]}
                      for v in r.get("videos", [])]
            prompt = tok.decode(encoder.generation_prompt(r["messages"], media))
            assert prompt.endswith("<SPECIAL_11>Assistant\n<think></think>")
        if task in ("text", "needle"):
            questions = {r["messages"][1]["content"] for r in train}
            assert not any(r["messages"][1]["content"] in questions for r in evals)  # held out
        if task == "needle":
            for r in evals:
                assert f"is {r['answer']}." in r["messages"][1]["content"]
        for r in train[:3]:
            for path in r.get("images", []):
                pixels = np.asarray(Image.open(os.path.join(out, "raw", task, path)))
                assert pixels.std() > 5  # something is drawn
    specs = [DatasetSpec(t, os.path.join(out, d["train"]), d["weight"]) for t, d in info["datasets"].items()]
    loader = PackedVLMLoader(specs, tok, seq_length=512, micro_batch_size=2, tile_size=64, patch_size=16,
                             video=VideoOptions(max_frames=16, evs_rate=0.75))
    for _ in range(4):
        check_batch(next(loader), tok.image_id, tokens_per_tile(64, 16))
    assert loader.counters["total"]["samples_used"] > 0
    assert sum(v for k, v in loader.counters["total"].items() if k not in ("samples_read", "samples_used",
                                                                           "truncated_text")
               and not k.startswith("video_")) == 0
    assert loader.counters["total"]["video_error"] == 0
    clips = sorted(os.listdir(os.path.join(out, "raw", "video", "clips")))
    assert any(c.endswith(".mp4") for c in clips) and any(c.endswith(".webm") for c in clips)
