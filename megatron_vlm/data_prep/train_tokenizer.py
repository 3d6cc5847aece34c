"""Train a small byte-level BPE (HF `tokenizers`) for the tiny demo runs.

    python -m megatron_vlm.data_prep.train_tokenizer --input a.jsonl b.jsonl --vocab-size 4096 --out DIR

Text comes from the records' turns (``messages``/``conversations``) and ``text`` fields; media
placeholders are removed. Digits are split one per token (helps small models with arithmetic),
everything else is GPT-2 style byte-level BPE, so any string round-trips. The special tokens
(ids 0..) are ``<unk>`` (padding), the Nemotron chat markers ``<SPECIAL_10/11/12>`` (12 = eos),
``<think> </think>`` and the VLM tokens ``<image> <img> </img> <quad> </quad> <ref> </ref> <box>
</box>``. Writes DIR/tokenizer.json and DIR/tokenizer_config.json (loadable by VLMTokenizer and
by transformers' PreTrainedTokenizerFast).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_vlm.data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from megatron_vlm.data.tokenizer import (
    CHAT_MARKERS,
    DEFAULT_PAD,
    END_OF_TURN,
    THINK_END,
    THINK_START,
    VLM_SPECIAL_TOKENS,
    VLMTokenizer,
)

SPECIAL_TOKENS = [DEFAULT_PAD, *CHAT_MARKERS, THINK_START, THINK_END, *VLM_SPECIAL_TOKENS]


def record_texts(paths: Iterable[str]) -> Iterator[str]:
    """The trainable text of every record in the JSONL files."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                if isinstance(record.get("text"), str):
                    yield record["text"]
                for turn in record.get("messages", record.get("conversations", [])) or []:
                    text = turn.get("content", turn.get("value", ""))
                    yield text.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")
                    if turn.get("reasoning"):
                        yield turn["reasoning"]


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> VLMTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return VLMTokenizer(tok, eos_token=END_OF_TURN, pad_token=DEFAULT_PAD)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the demo byte-level BPE tokenizer.")
    p.add_argument("--input", nargs="+", required=True, help="JSONL files")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="a merge needs at least this many occurrences (default 2)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    tok = train_bpe(record_texts(args.input), args.vocab_size, args.min_frequency)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
