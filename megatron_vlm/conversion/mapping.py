"""Weight-mapping tables: one list of :class:`Rule` per model part, used in both directions.

A rule ties a few of our tensors (full, TP=1 names) to a few Hugging Face tensors, with the
function that goes one way and its inverse. Renames are rules with identity functions; fused
tensors (megatron's interleaved qkv vs HF's q/k/v) are one rule with two functions. Export and
import walk the same list, rule by rule, so only the tensors of one rule are in memory at a time
(:func:`stream_to_hf`), and a shape plan is derived without reading any data by running the
functions on ``meta`` tensors (:func:`plan_hf_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch

Tensors = Dict[str, torch.Tensor]


def _same(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(tensors)


@dataclass(frozen=True)
class Rule:
    ours: Tuple[str, ...]
    hf: Tuple[str, ...]
    to_hf: Callable[..., Tuple[torch.Tensor, ...]] = _same
    to_ours: Callable[..., Tuple[torch.Tensor, ...]] = _same


def rename(ours: str, hf: str) -> Rule:
    return Rule((ours,), (hf,))


def with_prefixes(rules: Iterable[Rule], ours_prefix: str, hf_prefix: str) -> List[Rule]:
    return [Rule(tuple(ours_prefix + k for k in r.ours), tuple(hf_prefix + k for k in r.hf),
                 r.to_hf, r.to_ours) for r in rules]


def _check_count(rule: Rule, out: Sequence, names: Sequence[str]) -> None:
    if len(out) != len(names):
        raise AssertionError(f"rule {rule.ours} -> {rule.hf} produced {len(out)} tensors")


def stream_to_hf(rules: Sequence[Rule], get: Callable[[str], torch.Tensor]
                 ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, one rule at a time; ``get`` fetches one of our tensors."""
    for rule in rules:
        out = rule.to_hf(*(get(k) for k in rule.ours))
        _check_count(rule, out, rule.hf)
        yield from zip(rule.hf, out)


def stream_to_ours(rules: Sequence[Rule], get: Callable[[str], torch.Tensor]
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(our name, tensor) pairs, one rule at a time; ``get`` fetches one HF tensor."""
    for rule in rules:
        out = rule.to_ours(*(get(k) for k in rule.hf))
        _check_count(rule, out, rule.ours)
        yield from zip(rule.ours, out)


def check_covers(rules: Sequence[Rule], keys: Iterable[str], side: str, what: str,
                 ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Every key of ``keys`` is used by a rule and every rule finds its keys, else a ValueError
    naming the leftovers / the missing ones (``side`` is "ours" or "hf")."""
    keys = set(keys)
    wanted = {k for r in rules for k in getattr(r, side)}
    leftovers = sorted(k for k in keys - wanted if not ignore(k))
    missing = sorted(wanted - keys)
    if leftovers:
        raise ValueError(f"{what}: {len(leftovers)} tensors not mapped: {leftovers[:12]}")
    if missing:
        raise ValueError(f"{what}: {len(missing)} tensors missing: {missing[:12]}")


def to_hf(rules: Sequence[Rule], state: Tensors) -> Tensors:
    return dict(stream_to_hf(rules, state.__getitem__))


def to_ours(rules: Sequence[Rule], state: Tensors) -> Tensors:
    return dict(stream_to_ours(rules, state.__getitem__))


def plan_shapes(rules: Sequence[Rule], shapes: Dict[str, Tuple[torch.Size, torch.dtype]],
                direction: str = "to_hf") -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    """Output (shape, dtype) per tensor from input shapes alone (the rules run on meta tensors)."""
    def meta(key):
        shape, dtype = shapes[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    stream = stream_to_hf if direction == "to_hf" else stream_to_ours
    return {k: (t.shape, t.dtype) for k, t in stream(rules, meta)}
