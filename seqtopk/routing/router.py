"""The one routing call every engine makes: candidates -> each token's rule -> weights -> packed ids.

Engine adapters hand over router logits of N flattened tokens, the family's scoring object, the layer's
settings, the per-token rules (seqtopk.routing.rules.TokenRules) and where the tokens sit in their
sequences (a layout: `DenseLayout` for [B, T] batches with padding, as transformers runs them;
seqtopk.routing.ragged.RaggedBatch for packed serving steps). They get back ids and weights in the
fixed-width [N, C] form MoE kernels take, with unchosen slots written by the engine's convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtopk.config import ResolvedConfig
from seqtopk.routing.paged import PagedHistory
from seqtopk.routing.ragged import RaggedBatch, select_ragged
from seqtopk.routing.rules import CAUSAL, TokenRules, budget_split, choose, pack
from seqtopk.routing.scoring import SoftmaxScoring


@dataclass
class DenseLayout:
    """B sequences of T tokens, flattened sequence-major (token t of sequence b is row b*T + t)."""

    batch: int
    tokens: int
    valid: torch.Tensor | None = None  # [B, T] real tokens (None: all)
    seen: torch.Tensor | None = None  # [B] real tokens of each sequence before these (streaming rule)

    def choose(self, values: torch.Tensor, rules: TokenRules, cfg: ResolvedConfig,
               history: torch.Tensor | None) -> torch.Tensor:
        shape = (self.batch, self.tokens)
        dense_rules = rules.laid_out(lambda codes: codes.view(shape))
        mask = choose(values.view(*shape, -1), self.valid, dense_rules, cfg, history, self.seen)
        return mask.view(values.shape)


@dataclass
class Routed:
    values: torch.Tensor  # [N, C] capped scores the tokens competed with (what a routing history keeps)
    mask: torch.Tensor  # [N, C] chosen slots
    ids: torch.Tensor  # [N, C] expert ids, unchosen slots by the engine's convention (rules.pack)
    weights: torch.Tensor  # [N, C] combine weights, 0 in unchosen slots

    def experts_per_token(self) -> torch.Tensor:
        return self.mask.sum(dim=-1)


def route(logits: torch.Tensor, scoring, cfg: ResolvedConfig, layout: DenseLayout | RaggedBatch | None,
          rules: TokenRules, history: torch.Tensor | None = None, unchosen: str = "drop") -> Routed:
    """Route the N tokens of one layer. layout None: the N tokens are one sequence, all real.

    history: earlier capped scores of each sequence in the layout's rows, for the causal rule: [rows, S, C],
    or a PagedHistory, which also records this step's scores when its layout names their slots.
    """
    if isinstance(layout, DenseLayout) and logits.shape[0] != layout.batch * layout.tokens:
        raise ValueError(f"router got {logits.shape[0]} tokens, expected {layout.batch}x{layout.tokens}")
    fused = _fused_decode_step(logits, scoring, cfg, layout, rules, history, unchosen)
    if fused is not None:
        return fused
    cand = scoring.candidates(logits, cfg.cap)
    if isinstance(layout, RaggedBatch):
        mask = select_ragged(cand.values, layout, rules, cfg, history)
    elif layout is None:
        mask = choose(cand.values.unsqueeze(0), None, rules, cfg).squeeze(0)
    else:
        mask = layout.choose(cand.values, rules, cfg, history)
    weights = scoring.weights(logits, cand, mask)
    if isinstance(history, PagedHistory):
        history.record(cand.values)
    return Routed(values=cand.values, mask=mask, ids=pack(cand.ids, mask, unchosen), weights=weights)


def _fused_decode_step(logits, scoring, cfg, layout, rules, history, unchosen) -> Routed | None:
    """A one-token step of a softmax-scored layer under the streaming rule, from paged history, in one fused
    kernel (seqtopk/kernels/cpu/paged_decode.cpp on CPU, seqtopk/kernels/decode_step.py on CUDA: the same
    decisions as the torch path, one call instead of ~25 small ops). None when any of that does not hold, or no
    kernel serves the device (seqtopk.routing.paged decides)."""
    if not (isinstance(layout, RaggedBatch) and layout.max_query == 1 and isinstance(history, PagedHistory)
            and type(scoring) is SoftmaxScoring and unchosen == "repeat_best"
            and rules.single_tokens().present == (CAUSAL,)):
        return None
    split = budget_split(cfg.k, cfg.cap, cfg.min_experts, cfg.exact_budget)
    probs = torch.softmax(logits.float(), dim=-1)
    out = history.softmax_decode_step(probs, layout.context, cfg.cap, split, scoring.renormalize, valid=layout.real)
    if out is None:
        return None
    values, weights, ids, mask = out
    return Routed(values=values, mask=mask, ids=ids, weights=weights)
