"""Generate the demo corpus, shard it and train its tokenizer: one command, a ready directory.

    python -m megatron_vlm.data_prep.make_demo_data --out demo_data [--scale 1.0] [--tile-size 64] [--workers 2]

Layout of OUT:

    raw/<task>/images/*.png             generated images
    raw/<task>/train.jsonl              training records (megatron_vlm/data_prep/records.py format)
    raw/<task>/eval.jsonl               held-out records, each with "answer" (exact expected
                                        output); chat records end with the reference assistant
                                        turn (generate after the user turn), code records carry
                                        "prefix" (continue it; the answer is the next line)
    shards/<task>/{train,eval}/         pre-tiled shards + index.json
    tokenizer/                          byte-level BPE (tokenizer.json, tokenizer_config.json)
    datasets.json                       what is where, tiling, suggested blend weights, counts

Tasks: see megatron_vlm/data_prep/demo_tasks.py. Everything is a function of --seed (and of the running
Python's standard library, which is the code corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import zlib

from megatron_vlm.data.tiling import TilingConfig

from . import demo_tasks
from .build_shards import build_shards
from .train_tokenizer import record_texts, train_bpe

# task -> (train count, eval count, suggested blend weight) at scale 1
TASKS = {
    "ocr": (3000, 100, 1.0),
    "chart": (2000, 100, 1.0),
    "table": (2000, 100, 1.0),
    "multi_image": (2000, 100, 1.0),
    "video": (800, 60, 1.0),
    "text": (3000, 100, 1.0),
    "code": (1500, 100, 1.0),
    "needle": (600, 50, 1.0),
    "needle_short": (1500, 50, 1.0),
}


def _task_rng(seed: int, task: str, split: str) -> random.Random:
    return random.Random(seed * 1_000_003 + zlib.crc32(f"{task}/{split}".encode()))


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def _question(record: dict) -> str:
    return record["messages"][1]["content"]


def generate_task(task: str, n_train: int, n_eval: int, task_dir: str, seed: int,
                  needle_words: tuple[int, int]) -> tuple[list[dict], list[dict]]:
    image_dir = os.path.join(task_dir, "images")
    if task == "code":
        return demo_tasks.make_code(_task_rng(seed, task, "all"), n_train, n_eval)
    if task in ("text", "needle", "needle_short"):
        def make(rng, n, prefix):
            if task == "text":
                return demo_tasks.make_text(rng, n, None, prefix)
            words = needle_words if task == "needle" else demo_tasks.NEEDLE_SHORT_WORDS
            return demo_tasks.make_needle(rng, n, words[0], words[1], prefix, task)

        evals = make(_task_rng(seed, task, "eval"), n_eval, f"{task}eval")
        held_out = {_question(r) for r in evals}
        rng, train = _task_rng(seed, task, "train"), []
        while len(train) < n_train:  # no eval question appears in training
            batch = [r for r in make(rng, n_train - len(train), f"{task}{len(train):06d}_") if _question(r) not in held_out]
            train += batch
        for i, r in enumerate(train):
            r["id"] = f"{task}{i:06d}"
        return train, evals
    os.makedirs(image_dir, exist_ok=True)
    make = getattr(demo_tasks, f"make_{task}")
    train = make(_task_rng(seed, task, "train"), n_train, image_dir, f"{task}")
    evals = make(_task_rng(seed, task, "eval"), n_eval, image_dir, f"{task}eval")
    return train, evals


def make_demo_data(out: str, seed: int = 0, scale: float = 1.0, tiling: TilingConfig = TilingConfig(64, 1, 6, True),
                   vocab_size: int = 4096, workers: int = 1, samples_per_shard: int = 256,
                   needle_words: tuple[int, int] = (600, 700), tasks: list[str] | None = None,
                   log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    info = {"tiling": tiling.to_dict(), "tokenizer": "tokenizer", "seed": seed, "scale": scale, "datasets": {}}
    train_jsonls = []
    for task in tasks or list(TASKS):
        n_train, n_eval, weight = TASKS[task]
        n_train, n_eval = max(1, round(n_train * scale)), max(1, round(n_eval * scale))
        task_dir = os.path.join(out, "raw", task)
        os.makedirs(task_dir, exist_ok=True)
        t0 = time.perf_counter()
        train, evals = generate_task(task, n_train, n_eval, task_dir, seed, needle_words)
        _write_jsonl(os.path.join(task_dir, "train.jsonl"), train)
        _write_jsonl(os.path.join(task_dir, "eval.jsonl"), evals)
        t1 = time.perf_counter()
        manifests = {}
        for split in ("train", "eval"):
            manifests[split] = build_shards(
                os.path.join(task_dir, f"{split}.jsonl"), os.path.join(out, "shards", task, split),
                tiling=tiling, samples_per_shard=samples_per_shard, workers=workers, prefix=f"{task}-{split}",
                log=log)
        train_jsonls.append(os.path.join(task_dir, "train.jsonl"))
        info["datasets"][task] = {
            "train": f"shards/{task}/train", "eval": f"shards/{task}/eval",
            "eval_jsonl": f"raw/{task}/eval.jsonl", "weight": weight,
            "num_train": manifests["train"]["num_samples"], "num_eval": manifests["eval"]["num_samples"],
            "num_train_shards": len(manifests["train"]["shards"]),
        }
        log(f"{task}: {len(train)} train / {len(evals)} eval records in {t1 - t0:.1f}s, "
            f"shards in {time.perf_counter() - t1:.1f}s")
    t0 = time.perf_counter()
    tokenizer = train_bpe(record_texts(train_jsonls), vocab_size=vocab_size)
    tokenizer.save(os.path.join(out, "tokenizer"))
    info["vocab_size"] = tokenizer.vocab_size
    log(f"tokenizer: {tokenizer.vocab_size} tokens in {time.perf_counter() - t0:.1f}s")
    with open(os.path.join(out, "datasets.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    log(f"demo data ready in {out} ({time.perf_counter() - start:.1f}s)")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Generate, shard and tokenize the demo corpus.")
    p.add_argument("--out", required=True, help="output folder (raw records, shards, tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every task's sample counts")
    p.add_argument("--tile-size", type=int, default=64, help="tile size in px (default 64)")
    p.add_argument("--max-tiles", type=int, default=6, help="most tiles per image (default 6)")
    p.add_argument("--no-thumbnail", action="store_true", help="no thumbnail tile")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default 4096)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--samples-per-shard", type=int, default=256, help="default 256")
    p.add_argument("--needle-words", type=int, nargs=2, default=(600, 700), metavar=("MIN", "MAX"),
                   help="filler words per (long) needle document (700 words is about 850 tokens)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None,
                   help="only these tasks (default: all)")
    args = p.parse_args(argv)
    tiling = TilingConfig(args.tile_size, 1, args.max_tiles, not args.no_thumbnail)
    make_demo_data(args.out, seed=args.seed, scale=args.scale, tiling=tiling, vocab_size=args.vocab_size,
                   workers=args.workers, samples_per_shard=args.samples_per_shard,
                   needle_words=tuple(args.needle_words), tasks=args.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
