"""The budget arithmetic: what k means as an exact number of (token, expert) pairs (SPEC section 5).

A leaf module (no seqtopk imports), so that the settings (seqtopk.config) validate k and fix a layer's
`BudgetSplit` once, when the layer is set up, and the rules (seqtopk.routing.rules) read it from there.
"""

from __future__ import annotations

import functools
import math

from fractions import Fraction
from typing import NamedTuple

MIN_K = 0.1  # below it nine tokens in ten would skip every expert: not a budget anyone serves
MAX_DENOMINATOR = 1000  # k is a multiple of 1/1000 (1.5, 0.75, 1/3 ...), so every budget is integer arithmetic


class BudgetSplit(NamedTuple):
    """How a token's budget splits between forced experts and the cut.

    The competing columns of m real tokens share `pairs(m)` = floor(m * per_token / scale + 1/2) pairs (SPEC
    section 5): exact integer arithmetic for a fractional k; with scale 1 it is m * per_token."""

    forced: int  # leading columns every real token keeps (its best min_experts)
    first: int  # first column that competes for the cut
    per_token: int  # pairs per real token the competing columns share, times `scale`
    scale: int = 1  # denominator of the per-token budget (1 for a whole k)

    def pairs(self, m):
        """Pairs the competing columns of m real tokens share (m: an int or an integer tensor)."""
        if self.scale == 1:
            return m * self.per_token
        return (m * self.per_token + self.scale // 2) // self.scale


@functools.lru_cache(maxsize=64)
def budget_split(k, cap: int, min_experts: int, exact_budget: bool) -> BudgetSplit:
    """The split of budget k among `cap` candidates with `min_experts` forced (a layer's is fixed once, as
    seqtopk.config.ResolvedConfig.split; the rules' plain-argument forms call this)."""
    numerator, scale = (k, 1) if isinstance(k, int) else _ratio(k)
    forced = min(min_experts, cap)
    if exact_budget:  # forced experts count toward B(m): the cut shares what is left
        return BudgetSplit(forced, forced, numerator - forced * scale, scale)
    return BudgetSplit(forced, 0, numerator, scale)


_RATIOS: dict = {}  # k -> (numerator, denominator), so a compiled graph reads a constant instead of tracing Fraction


def _ratio(k) -> tuple[int, int]:
    if k not in _RATIOS:
        fraction = budget_fraction(k)
        _RATIOS[k] = (fraction.numerator, fraction.denominator)
    return _RATIOS[k]


def budget_fraction(k) -> Fraction:
    """k as an exact fraction (what every rule's budget B(m) = floor(m*k + 1/2) is computed from), validated."""
    if isinstance(k, bool) or not isinstance(k, (int, float, Fraction)):
        raise ValueError(f"k must be a number (an integer, or a fraction such as 1.5), got {k!r}")
    if not math.isfinite(k) or k < MIN_K:
        raise ValueError(f"k must be >= {MIN_K} experts per token, got {k}")
    exact = Fraction(k).limit_denominator(MAX_DENOMINATOR)
    if abs(float(exact) - float(k)) > 1e-9:
        raise ValueError(f"k must be a multiple of 1/{MAX_DENOMINATOR} (e.g. 1.5, 0.75), got {k}")
    return exact


def normalized_k(k) -> int | float:
    """k as an int when it is whole (so k=4.0 routes exactly as k=4), else as a float."""
    exact = budget_fraction(k)
    return int(exact) if exact.denominator == 1 else float(exact)
