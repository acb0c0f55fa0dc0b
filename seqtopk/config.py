"""SeqTopK settings: one validated object shared by every engine adapter.

Validation happens in two steps, both before any model is touched: `SeqTopKConfig(...)` checks what can be
checked alone (types, names, ranges), and `resolve()` checks the settings against one MoE layer (its top_k
and how many experts a token may choose from) and fills in the defaults.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field, fields

from seqtopk.budget import BudgetSplit, budget_fraction, budget_split, normalized_k

PREFILL_RULES = ("sequence", "causal")
DECODE_RULES = ("expert_cache", "topk")


@dataclass(frozen=True)
class SeqTopKConfig:
    """How SeqTopK routes.

    k: per-token budget K (the sequence spends T*K). Default: the model's top_k. May be below it and need not be
        an integer (k >= 0.1): T tokens then spend B(T) = floor(T*k + 1/2) pairs (SPEC section 5).
    cap: most experts one token may take (C). Default: ceil(k) + 2, limited to what the layer offers.
    min_experts: experts every token keeps even below the cut. Default: 1, or 0 when k < 1 (a budget below
        one expert per token lets some tokens take none).
    exact_budget: forced minimums count toward T*K, so a sequence spends exactly T*K in prefill.
    prefill: "sequence" (published, non-causal: the cut is taken over the whole sequence) or
        "causal" (token t's cut uses tokens <= t only; equals streaming decode).
    decode: "expert_cache" (streaming rule over the routing history) or "topk" (plain per-token TopK).
    """

    k: int | float | None = None
    cap: int | None = None
    min_experts: int | None = None
    exact_budget: bool = False
    prefill: str = "sequence"
    decode: str = "expert_cache"

    def __post_init__(self):
        if self.k is not None:
            budget_fraction(self.k)  # validates
        _check_int("cap", self.cap, minimum=1, optional=True)
        _check_int("min_experts", self.min_experts, minimum=0, optional=True)
        if not isinstance(self.exact_budget, bool):
            raise ValueError(f"exact_budget must be True or False, got {self.exact_budget!r}")
        if self.prefill not in PREFILL_RULES:
            raise ValueError(f"prefill must be one of {PREFILL_RULES}, got {self.prefill!r}")
        if self.decode not in DECODE_RULES:
            raise ValueError(f"decode must be one of {DECODE_RULES}, got {self.decode!r}")
        if self.k is not None and self.cap is not None and self.cap < self.k:
            raise ValueError(f"cap ({self.cap}) must be >= k ({self.k}): a token may take at most cap experts")
        if self.k is not None and self.min_experts is not None and self.min_experts > self.k:
            raise ValueError(f"min_experts ({self.min_experts}) must be <= k ({self.k})"
                             + ("; set min_experts=0 to let some tokens take no expert" if self.k < 1 else ""))
        if self.k is not None and self.decode == "topk" and budget_fraction(self.k).denominator != 1:
            raise ValueError(f"decode='topk' gives every generated token exactly k experts, so k must be an integer "
                             f"(got k={self.k}); use decode='expert_cache' for a fractional budget")

    @classmethod
    def from_dict(cls, values: dict | None) -> "SeqTopKConfig":
        """Build from a plain dict (e.g. vLLM's additional_config); unknown keys are an error, not ignored."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SeqTopK option(s) {unknown}; valid options are {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self, top_k: int, max_cap: int, where: str = "layer") -> "ResolvedConfig":
        """Fill defaults for one MoE layer and check them against it.

        top_k: the layer's own per-token expert count. max_cap: how many experts one token can choose
        from (all experts, or fewer under group-limited routing).
        """
        k = normalized_k(self.k) if self.k is not None else top_k
        if k > max_cap:
            raise ValueError(f"k={k} exceeds the {max_cap} experts a token can choose from in {where}")
        cap = self.cap if self.cap is not None else min(math.ceil(k) + 2, max_cap)
        if cap < k:
            raise ValueError(f"cap ({cap}) must be >= k ({k}) in {where}")
        if cap > max_cap:
            raise ValueError(
                f"cap={cap} exceeds the {max_cap} experts a token can choose from in {where}; use cap <= {max_cap}"
            )
        min_experts = self.min_experts if self.min_experts is not None else (1 if k >= 1 else 0)
        if min_experts > k:
            raise ValueError(f"min_experts ({min_experts}) must be <= k ({k}) in {where}")
        return ResolvedConfig(k=k, cap=cap, min_experts=min_experts, exact_budget=self.exact_budget,
                              prefill=self.prefill, decode=self.decode)


@dataclass(frozen=True)
class ResolvedConfig:
    """Settings with every default filled in, for one layer, and the budget split they fix (computed here,
    once per layer, outside any compiled graph; every rule and kernel reads `split`)."""

    k: int | float  # an int when k is whole
    cap: int
    min_experts: int
    exact_budget: bool
    prefill: str
    decode: str
    split: BudgetSplit = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "split", budget_split(self.k, self.cap, self.min_experts, self.exact_budget))


def _check_int(name: str, value, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
