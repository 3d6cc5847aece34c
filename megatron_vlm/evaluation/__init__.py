"""Evaluation by generation on held-out data: greedy decoding (generate.py) and scoring of eval
shards with reference answers, the demo tasks among them (tasks.py); the command line is
``python -m megatron_vlm.cli.evaluate``."""
