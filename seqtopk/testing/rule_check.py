"""Rule-level verification, shared by the transformers and vLLM family tests: the torch streaming rule applied
to the capped scores an engine itself computed must choose the slots the engine chose, whatever its numerics."""

from __future__ import annotations

import torch


def causal_mismatches(values: torch.Tensor, chosen: torch.Tensor, cfg, k: float | None = None) -> list[int]:
    """Positions of one sequence where seqtopk.routing.rules.select_causal, applied to its capped scores
    `values` [T, C] (best first, in position order) with the layer's resolved settings `cfg`, chooses other
    slots than `chosen` [T, C]. k: another budget (a deliberately wrong rule, to show the check can fail)."""
    from seqtopk.routing.rules import select_causal

    expected = select_causal(values[None], None, cfg.k if k is None else k, cfg.min_experts, cfg.exact_budget)[0]
    return (expected != chosen).any(-1).nonzero().flatten().tolist()
