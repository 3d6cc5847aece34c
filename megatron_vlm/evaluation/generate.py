"""Greedy decoding and sequence log-likelihood for the VLM, in one process at TP=1 / PP=1.

    result = greedy_generate(model, prompt_ids, tiles=tiles, max_new_tokens=32,
                             stop_ids={tokenizer.eos_id}, vocab_limit=tokenizer.vocab_size)
    result.tokens        # generated ids, the stop token excluded
    result.stop_reason   # "stop_id" | "stop_fn" | "length"

Every new token re-runs the full forward over prompt + generated tokens (no KV / SSM-state
cache): exact and simple, and fast enough for the tiny model and answers of a few tokens. The
model must hold every layer (``pre_process`` and ``post_process``) and its logits must cover the
whole vocabulary (tensor parallel size 1).

``tiles`` are the sample's tiles exactly as the training batches carry them: float32
[N, 3, T, T], CLIP-normalised (``megatron_vlm.data.image.normalize_tiles`` of the shard's uint8
tiles), in the order of the prompt's ``<image>`` tokens. uint8 [N, T, T, 3] arrays are normalised
here with the same function.

Logits of padded vocabulary entries (ids >= ``vocab_limit``, which the tokenizer never produces)
are excluded from the argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch


@dataclass
class Generation:
    tokens: list           # generated ids, without the stop token
    stop_reason: str       # "stop_id" (a stop token), "stop_fn" (the callback), "length"
    stop_token: Optional[int] = None
    forwards: int = 0      # forward passes run


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_whole_model(model: torch.nn.Module) -> None:
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("generation needs the whole model on one rank (pipeline parallel size 1)")


def prepare_tiles(tiles, device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """None/empty -> None; uint8 [N, T, T, 3] -> normalised [N, 3, T, T]; float tensors kept."""
    if tiles is None:
        return None
    if isinstance(tiles, np.ndarray) or (isinstance(tiles, torch.Tensor) and tiles.dtype == torch.uint8):
        if len(tiles) == 0:
            return None
        from megatron_vlm.data.image import normalize_tiles

        tiles = normalize_tiles(tiles)
    if tiles.numel() == 0:
        return None
    return tiles.to(device=device, dtype=dtype)


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def forward_logits(model: torch.nn.Module, ids: Sequence[int], tiles=None,
                   vocab_limit: Optional[int] = None, last_only: bool = False,
                   media: Optional[dict] = None) -> torch.Tensor:
    """float32 logits [s, V] (or [V] with ``last_only``) of one token sequence.

    ``media``: ``{"tiles_per_media": [...], "media_tokens": [...]}`` for EVS-pruned videos.

    With ``vocab_limit`` the padded entries (ids >= vocab_limit) are set to -inf.
    """
    _check_whole_model(model)
    device = _device(model)
    input_ids = torch.as_tensor(list(ids), dtype=torch.long, device=device).unsqueeze(0)
    tiles = prepare_tiles(tiles, device, _param_dtype(model))
    extra = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in (media or {}).items()}
    logits = model(input_ids, tiles=tiles, **extra)  # [1, s, V]
    logits = logits[0, -1] if last_only else logits[0]
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_limit:] = float("-inf")
    return logits


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: Sequence[int], tiles=None,
                    max_new_tokens: int = 32, stop_ids: Iterable[int] = (),
                    vocab_limit: Optional[int] = None,
                    stop_fn: Optional[Callable[[list], bool]] = None,
                    media: Optional[dict] = None) -> Generation:
    """Greedy continuation of ``prompt_ids`` (the image tokens already expanded).

    Stops after ``max_new_tokens`` tokens, at the first token in ``stop_ids`` (not included in
    ``tokens``), or when ``stop_fn(tokens)`` returns True after a token was appended.
    """
    if not prompt_ids:
        raise ValueError("empty prompt")
    was_training = model.training
    model.eval()
    device = _device(model)
    tiles = prepare_tiles(tiles, device, _param_dtype(model))
    stop_ids = set(int(t) for t in stop_ids)
    seq = list(int(t) for t in prompt_ids)
    out: list = []
    forwards = 0
    try:
        for _ in range(max_new_tokens):
            logits = forward_logits(model, seq, tiles, vocab_limit=vocab_limit, last_only=True, media=media)
            forwards += 1
            token = int(torch.argmax(logits))
            if token in stop_ids:
                return Generation(out, "stop_id", token, forwards)
            out.append(token)
            seq.append(token)
            if stop_fn is not None and stop_fn(out):
                return Generation(out, "stop_fn", None, forwards)
        return Generation(out, "length", None, forwards)
    finally:
        model.train(was_training)


@torch.no_grad()
def sequence_nll(model: torch.nn.Module, ids: Sequence[int], targets: Optional[Sequence[bool]] = None,
                 tiles=None, vocab_limit: Optional[int] = None) -> tuple:
    """(summed negative log-likelihood, number of predicted tokens) of one sequence.

    Token i (i >= 1) is predicted from tokens < i; ``targets[i]`` selects which ones count
    (default: all but the first), as the training loss mask does.
    """
    was_training = model.training
    model.eval()
    try:
        logits = forward_logits(model, ids, tiles, vocab_limit=vocab_limit)  # [s, V]
    finally:
        model.train(was_training)
    ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp.gather(1, ids_t[1:].unsqueeze(1)).squeeze(1)  # nll of token i+1
    if targets is None:
        mask = torch.ones_like(nll, dtype=torch.bool)
    else:
        mask = torch.as_tensor(np.asarray(targets, dtype=bool)[1:], device=nll.device)
    count = int(mask.sum())
    total = float(nll[mask].sum()) if count else 0.0
    if not math.isfinite(total):
        total = float("inf")
    return total, count
