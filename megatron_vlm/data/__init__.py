"""Data pipeline for the VLM: tiling, shards, tokenizer + prompt, packing loader.

Modules (import them directly; this package imports nothing so that light users such as
``megatron_vlm.data_prep`` do not pay for torch):

- ``tiling``: dynamic tiling rule (tile size, 1..12 tiles, thumbnail) and tokens per tile
- ``image``: image decoding/encoding, CLIP normalisation
- ``schema``: shard sample layout and manifest format
- ``shard_writer`` / ``shard_reader``: reproducible tar writing; fault-tolerant tar reading
- ``dataset_stream``: per-rank, seeded, seekable sample order of one dataset
- ``sample_decoder``: shard sample -> metadata + uint8 tiles
- ``tokenizer``: HF tokenizers wrapper with the VLM special tokens
- ``prompt``: Nemotron Nano V2 chat template, media expansion, loss targets
- ``packing``: fit-to-length policy and greedy row packing
- ``blend``: weighted dataset choice
- ``batch``: the batch contract and collation
- ``loader``: ``PackedVLMLoader`` (state_dict / load_state_dict for exact resume)
- ``prefetch``: ``PrefetchingLoader``, the same batches built a few steps ahead in a thread
"""
