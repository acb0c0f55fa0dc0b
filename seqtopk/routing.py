"""One routing call: scores -> capped candidates -> SeqTopK selection -> the family's weights.

Engine adapters give flattened router logits plus the sequence structure they recovered (B, T, which
tokens are real, and for streaming the earlier capped scores) and get back ids and weights in the
fixed-width form MoE kernels take, with -1 / 0 in unchosen slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtopk.config import ResolvedConfig
from seqtopk.selection import pack_choice, select_causal, select_sequence

RULES = ("sequence", "causal", "topk")


@dataclass
class Routed:
    values: torch.Tensor  # [B, T, C] capped scores that tokens competed with (what the history keeps)
    mask: torch.Tensor  # [B, T, C] chosen slots
    ids: torch.Tensor  # [B*T, C] expert ids, -1 in unchosen slots
    weights: torch.Tensor  # [B*T, C] combine weights, 0 in unchosen slots

    def experts_per_token(self) -> torch.Tensor:
        return self.mask.sum(dim=-1)


def route(logits: torch.Tensor, scoring, cfg: ResolvedConfig, batch: int, tokens: int,
          valid: torch.Tensor | None, rule: str, history: torch.Tensor | None = None,
          seen: torch.Tensor | None = None) -> Routed:
    """Route B*T flattened tokens (sequence-major) of one layer. See seqtopk.selection for the rules."""
    if logits.shape[0] != batch * tokens:
        raise ValueError(f"router got {logits.shape[0]} tokens, expected {batch}x{tokens}")
    cand = scoring.candidates(logits, cfg.cap)
    values = cand.values.view(batch, tokens, cfg.cap)
    if rule == "sequence":
        mask = select_sequence(values, valid, cfg.k, cfg.min_experts, cfg.exact_budget)
    elif rule == "causal":
        mask = select_causal(values, valid, cfg.k, cfg.min_experts, cfg.exact_budget, history, seen)
    elif rule == "topk":
        mask = torch.zeros_like(values, dtype=torch.bool)
        mask[..., : cfg.k] = True
        if valid is not None:
            mask &= valid.unsqueeze(-1)
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    flat_mask = mask.view(batch * tokens, cfg.cap)
    weights = scoring.weights(logits, cand, flat_mask)
    return Routed(values=values, mask=mask, ids=pack_choice(cand.ids, flat_mask), weights=weights)
