"""Shared fixtures for the data pipeline tests: a tiny tokenizer and small generated datasets."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_vlm.data_prep.build_shards import build_shards  # noqa: E402
from megatron_vlm.data_prep.train_tokenizer import train_bpe  # noqa: E402
from megatron_vlm.data.tiling import TilingConfig  # noqa: E402
from megatron_vlm.data.tokenizer import VLMTokenizer  # noqa: E402

TILE = 32  # small tiles keep the tests fast; with patch 16 each tile is 1 token
PATCH = 8  # 32 px tiles, patch 8, pixel shuffle 0.5 -> 4 tokens per tile
WORDS = "red green blue cat dog house tree river what is the color of shape in image one two three".split()


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 999)}"
            for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    tok = train_bpe(corpus_lines(), vocab_size=400)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(out)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> VLMTokenizer:
    return VLMTokenizer.from_pretrained(tokenizer_dir)


def make_image(path: str, size: tuple[int, int], seed: int) -> None:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        d.rectangle((x0, y0, x0 + size[0] // 3, y0 + size[1] // 3), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    img.save(path)


def write_records(directory: str, n: int, seed: int = 0, name: str = "data.jsonl",
                  long_text_every: int = 0) -> str:
    """n records: about half with 1-2 images of assorted sizes, the rest text-only chats or docs."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(directory, "img"), exist_ok=True)
    sizes = [(64, 32), (32, 32), (96, 64), (40, 100), (128, 32), (20, 20)]
    lines = []
    for i in range(n):
        kind = i % 4
        if kind in (0, 1):
            n_img = 1 + (kind == 1)
            paths = []
            for j in range(n_img):
                rel = f"img/{seed}_{i}_{j}.png"
                make_image(os.path.join(directory, rel), sizes[(i + j) % len(sizes)], seed * 10_000 + i * 10 + j)
                paths.append(rel)
            rec = {"id": f"r{i}", "messages": [
                {"role": "system", "content": "/no_think"},
                {"role": "user", "content": "<image>\n" * n_img + f"what is the color {i}"},
                {"role": "assistant", "content": rng.choice(WORDS)}], "images": paths}
        elif kind == 2:
            # long_text_every: some chats are far longer than the tests' rows, with the long part
            # in the answer (truncation keeps targets) or in the question (nothing left to learn)
            long_answer = long_text_every and i % long_text_every == 2
            long_question = long_text_every and i % long_text_every == 6
            question = " ".join(rng.choice(WORDS) for _ in range(400 if long_question else 6))
            answer = " ".join(rng.choice(WORDS) for _ in range(400)) if long_answer else f"{rng.randint(0, 99)}"
            rec = {"id": f"r{i}", "messages": [{"role": "user", "content": question},
                                               {"role": "assistant", "content": answer}]}
        else:
            rec = {"id": f"r{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))}
        lines.append(json.dumps(rec))
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def dataset_a(tmp_path_factory) -> str:
    """48 samples in 12 shards of 4 (32 px tiles)."""
    root = tmp_path_factory.mktemp("dataset_a")
    jsonl = write_records(str(root), 48, seed=1)
    out = str(root / "shards")
    build_shards(jsonl, out, tiling=TilingConfig(TILE, 1, 6, True), samples_per_shard=4, prefix="a", log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def dataset_b(tmp_path_factory) -> str:
    """30 samples in 5 shards of 6, with some long text turns."""
    root = tmp_path_factory.mktemp("dataset_b")
    jsonl = write_records(str(root), 30, seed=2, long_text_every=8)
    out = str(root / "shards")
    build_shards(jsonl, out, tiling=TilingConfig(TILE, 1, 6, True), samples_per_shard=6, prefix="b", log=lambda m: None)
    return out
