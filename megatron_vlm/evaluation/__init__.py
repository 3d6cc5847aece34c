"""Evaluation by generation on held-out data: greedy decoding (generate.py) and per-task scoring
(tasks.py); the command line is ``python -m tools.evaluate``."""
