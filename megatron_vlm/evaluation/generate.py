"""Greedy decoding and sequence log-likelihood for the VLM, in one process at TP=1 / PP=1.

    result = greedy_generate(model, prompt_ids, tiles=tiles, max_new_tokens=32,
                             stop_ids={tokenizer.eos_id}, vocab_limit=tokenizer.vocab_size)
    result.tokens        # generated ids, the stop token excluded
    result.stop_reason   # "stop_id" | "stop_fn" | "length"

The hybrid LLM / VLM decode incrementally (``megatron_vlm.models.decode``): one prefill over the
prompt, then one step per new token with the Mamba convolution + SSM states and the attention KV
cache, and only the last position's logits; the tokens equal those of re-running the full
forward for every token (``use_cache=False``, also the path for other models). The model must
hold every layer (``pre_process`` and ``post_process``) and its logits must cover the whole
vocabulary (tensor parallel size 1).

``sample_generate`` draws instead of taking the argmax (temperature, top-k, top-p; seeded).

``tiles`` are the sample's tiles exactly as the training batches carry them: float32
[N, 3, T, T], CLIP-normalised, in the order of the prompt's ``<image>`` tokens; or the shard's
uint8 [N, T, T, 3], which travel to the device as uint8 and are normalised there by the VLM
(``models.vlm.normalize_uint8_tiles``, the same arithmetic as ``data.image.normalize_tiles``).

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
    """None/empty -> None; uint8 [N, T, T, 3] -> the same on ``device`` (the VLM normalises
    them there); float tensors -> ``device`` / ``dtype``."""
    if tiles is None:
        return None
    if isinstance(tiles, np.ndarray) or (isinstance(tiles, torch.Tensor) and tiles.dtype == torch.uint8):
        if len(tiles) == 0:
            return None
        tiles = torch.as_tensor(tiles)
        if tiles.dtype == torch.uint8:  # moved as uint8, normalised on the device by the model
            return tiles.to(device)
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
    if hasattr(model, "embed_inputs") or not hasattr(model, "decoder"):
        logits = model(input_ids, tiles=tiles, **extra)  # [1, s, V]
    else:  # the text-only LLM (megatron's MambaModel)
        logits = model(input_ids, None, None)
    logits = logits[0, -1] if last_only else logits[0]
    return _mask_vocab(logits.float(), vocab_limit)


def _mask_vocab(logits: torch.Tensor, vocab_limit: Optional[int]) -> torch.Tensor:
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_limit:] = float("-inf")
    return logits


def _choose(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            generator: Optional[torch.Generator]) -> int:
    """Argmax at temperature 0, else a draw from the tempered, top-k / top-p truncated softmax."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def sample_generate(model: torch.nn.Module, prompt_ids: Sequence[int], tiles=None,
                    max_new_tokens: int = 32, stop_ids: Iterable[int] = (),
                    vocab_limit: Optional[int] = None,
                    stop_fn: Optional[Callable[[list], bool]] = None,
                    temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, seed: Optional[int] = None,
                    use_cache: bool = True, media: Optional[dict] = None) -> Generation:
    """Continuation of ``prompt_ids`` (the image tokens already expanded): argmax at
    ``temperature`` 0, else sampled (``seed`` makes it repeatable). ``media``: as for
    ``forward_logits`` (EVS-pruned videos).

    Stops after ``max_new_tokens`` tokens, at the first token in ``stop_ids`` (not included in
    ``tokens``), or when ``stop_fn(tokens)`` returns True after a token was appended.
    ``use_cache``: incremental decoding when the model supports it (else full re-runs).
    """
    from megatron_vlm.models.decode import IncrementalDecoder, supports_incremental

    if not prompt_ids:
        raise ValueError("empty prompt")
    _check_whole_model(model)
    was_training = model.training
    model.eval()
    device = _device(model)
    tiles = prepare_tiles(tiles, device, _param_dtype(model))
    stop_ids = set(int(t) for t in stop_ids)
    seq = list(int(t) for t in prompt_ids)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    incremental = None
    if use_cache and supports_incremental(model):
        incremental = IncrementalDecoder(model, capacity=len(seq) + max_new_tokens)
    out: list = []
    forwards = 0
    try:
        for _ in range(max_new_tokens):
            if incremental is None:
                logits = forward_logits(model, seq, tiles, vocab_limit=vocab_limit, last_only=True,
                                        media=media)
            elif forwards == 0:
                ids = torch.as_tensor(seq, dtype=torch.long, device=device).unsqueeze(0)
                extra = {k: torch.as_tensor(v, dtype=torch.long, device=device)
                         for k, v in (media or {}).items()}
                logits = _mask_vocab(incremental.prefill(ids, tiles, **extra)[0], vocab_limit)
            else:
                last = torch.as_tensor([seq[-1]], dtype=torch.long, device=device)
                logits = _mask_vocab(incremental.step(last)[0], vocab_limit)
            forwards += 1
            token = _choose(logits, temperature, top_k, top_p, generator)
            if token in stop_ids:
                return Generation(out, "stop_id", token, forwards)
            out.append(token)
            seq.append(token)
            if stop_fn is not None and stop_fn(out):
                return Generation(out, "stop_fn", None, forwards)
        return Generation(out, "length", None, forwards)
    finally:
        model.train(was_training)


def greedy_generate(model: torch.nn.Module, prompt_ids: Sequence[int], tiles=None,
                    max_new_tokens: int = 32, stop_ids: Iterable[int] = (),
                    vocab_limit: Optional[int] = None,
                    stop_fn: Optional[Callable[[list], bool]] = None,
                    use_cache: bool = True, media: Optional[dict] = None) -> Generation:
    """Greedy continuation (``sample_generate`` at temperature 0)."""
    return sample_generate(model, prompt_ids, tiles, max_new_tokens, stop_ids, vocab_limit,
                           stop_fn, temperature=0.0, use_cache=use_cache, media=media)


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
