"""Offline data preparation: shard building, tokenizer training, the demo corpus."""
