"""Run a PackedVLMLoader for some batches and write batch digests (used by the resume test).

    python tests/data/loader_probe.py CONFIG.json OUT.json --batches N [--load-state S.json] [--save-state S.json]

CONFIG holds the loader arguments; OUT gets {"digests", "keys", "counters", "state"}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_vlm.data.loader import DatasetSpec, PackedVLMLoader  # noqa: E402
from megatron_vlm.data.tokenizer import VLMTokenizer  # noqa: E402


def batch_digest(batch: dict) -> str:
    h = hashlib.sha256()
    for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "tiles", "tiles_per_media"):
        h.update(key.encode())
        h.update(batch[key].contiguous().numpy().tobytes())
    h.update(json.dumps([batch["max_seqlen"], batch["sample_keys"]]).encode())
    return h.hexdigest()


def make_loader(config: dict) -> PackedVLMLoader:
    cfg = dict(config)
    specs = [DatasetSpec(name, shards, weight) for name, shards, weight in cfg.pop("datasets")]
    tokenizer = VLMTokenizer.from_pretrained(cfg.pop("tokenizer"))
    return PackedVLMLoader(specs, tokenizer, **cfg)


def run(config: dict, batches: int, load_state: dict | None = None) -> dict:
    loader = make_loader(config)
    if load_state is not None:
        loader.load_state_dict(load_state)
    digests, keys = [], []
    for _ in range(batches):
        batch = next(loader)
        digests.append(batch_digest(batch))
        keys.append(batch["sample_keys"])
    return {"digests": digests, "keys": keys, "counters": loader.counters, "state": loader.state_dict()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--load-state")
    p.add_argument("--save-state")
    args = p.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    state = None
    if args.load_state:
        with open(args.load_state) as f:
            state = json.load(f)
    result = run(config, args.batches, state)
    if args.save_state:
        with open(args.save_state, "w") as f:
            json.dump(result["state"], f)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
