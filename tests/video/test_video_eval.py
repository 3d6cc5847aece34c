"""Evaluation of the video task at q = 0 and at the recipe's EVS rate: the model is given the
pruned layout (media kwargs), and LLM tokens per video are reported."""

import json
import os

import torch

from megatron_vlm.data_prep.build_shards import build_shards
from megatron_vlm.data.tiling import TilingConfig
from megatron_vlm.data.video import VideoOptions
from megatron_vlm.evaluation.tasks import evaluate_tasks
from tests.video.conftest import clip_bytes

TILE, TPF = 32, 4


class RecordingModel(torch.nn.Module):
    """Answers eos at once; records the <image> count and the EVS kwargs of every forward."""

    def __init__(self, eos_id: int, image_id: int, vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.eos_id, self.image_id, self.vocab, self.calls = eos_id, image_id, vocab, []

    def forward(self, input_ids, tiles=None, tiles_per_media=None, media_tokens=None):
        self.calls.append((int((input_ids == self.image_id).sum()), int(tiles.shape[0]),
                           None if media_tokens is None else media_tokens.tolist()))
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[..., self.eos_id] = 1.0
        return logits


def test_video_scores_at_q0_and_recipe_rate(tmp_path, tokenizer):
    root = tmp_path / "demo"
    os.makedirs(root / "raw" / "video" / "clips")
    records = []
    for i, (duration, codec) in enumerate([(4.0, "h264"), (6.0, "vp9")]):
        name = f"c{i}.{'mp4' if codec == 'h264' else 'webm'}"
        (root / "raw" / "video" / "clips" / name).write_bytes(clip_bytes(duration, 10, codec, seed=i)[0])
        records.append({"id": f"v{i}", "answer": "right", "messages": [
            {"role": "user", "content": "<video>\nwhere"}, {"role": "assistant", "content": "right"}],
            "videos": [{"type": "video", "source": f"clips/{name}"}]})
    jsonl = root / "raw" / "video" / "eval.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    build_shards(str(jsonl), str(root / "shards" / "video" / "eval"), tiling=TilingConfig(TILE, 1, 4, True),
                 log=lambda m: None)
    model = RecordingModel(tokenizer.eos_id, tokenizer.image_id, tokenizer.vocab_size)
    scores, results = evaluate_tasks(model, tokenizer, ["video"], root, tile_size=TILE, tokens_per_tile=TPF,
                                     video=VideoOptions(max_frames=10, evs_rate=0.75))
    frames = [8, 10]  # 4 s and 6 s at 2 fps, at most 10 frames
    kept = [max(TPF, int(f * TPF * 0.25)) for f in frames]
    assert scores["video_tokens"] == sum(f * TPF for f in frames) / 2
    assert kept == [8, 10] and scores["video_evs_tokens"] == 9.0  # vs 36.0 at q = 0
    assert scores["video_acc"] == 0.0 and scores["video_evs_acc"] == 0.0
    assert [r.task for r in results] == ["video", "video_evs"]
    # q = 0: all tokens, no EVS kwargs; q = 0.75: the pruned count with the kwargs the model needs
    assert model.calls == [(f * TPF, f, None) for f in frames] + [(k, f, [k]) for f, k in zip(frames, kept)]
