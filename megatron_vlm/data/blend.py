"""Weighted choice of the dataset each next sample comes from.

Draw ``i`` picks dataset ``k`` with probability ``weights[k] / sum(weights)`` from a uniform number
that is a pure function of (seed, i) (SplitMix64), so the only state is the draw counter: a
resumed loader with the same counter makes the same choices.
"""

from __future__ import annotations

import bisect
import itertools

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, index: int) -> float:
    """A number in [0, 1) determined by (seed, index)."""
    return (_splitmix64(_splitmix64(seed & _MASK) ^ (index & _MASK)) >> 11) / float(1 << 53)


class WeightedBlend:
    def __init__(self, weights: list[float], seed: int):
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        total = float(sum(weights))
        self.probabilities = [w / total for w in weights]
        self._cumulative = list(itertools.accumulate(self.probabilities))
        self._cumulative[-1] = 1.0  # guard against rounding
        self.seed = seed

    def choose(self, draw_index: int) -> int:
        u = uniform(self.seed, draw_index)
        k = bisect.bisect_right(self._cumulative, u)
        while self.probabilities[k] == 0:  # u landed on a zero-width bucket edge
            k += 1
        return k
