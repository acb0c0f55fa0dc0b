"""Each MoE family's own scoring, split into the part SeqTopK replaces (selection) and the part it keeps.

A scoring object answers three questions for router logits [N, E]:
- candidates(logits, cap, top=...) -> Candidates: each token's best `cap` experts (ids) and the scores they
  compete with across the sequence (values), best first (rules.capped_candidates's order, or `top`, a compiled
  implementation of it), plus the family's scores for the weights (computed once);
- max_candidates(num_experts): how many experts one token can choose from at all;
- weights(logits, candidates, mask): the combine weights of the chosen slots (0 for unchosen ones), by the
  family's own convention.
Pure torch; used by the transformers patches and the vLLM adapter alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from seqtopk.routing.rules import capped_candidates


class Candidates(NamedTuple):
    values: torch.Tensor  # [N, cap] scores the tokens compete with, best first
    ids: torch.Tensor  # [N, cap] expert ids
    scores: torch.Tensor  # [N, E] the family's scores the weights are taken from


def _renormalize(weights: torch.Tensor, eps: float = 0.0, min_total: float = 0.0, p: float | None = None) -> torch.Tensor:
    """Chosen weights divided by their sum (or p-norm), as the family does it: + eps, or clamped below."""
    total = weights.sum(dim=-1, keepdim=True) if p is None else torch.norm(weights, p=p, dim=-1, keepdim=True)
    total = total.clamp(min=min_total) if min_total > 0 else total + eps
    # A token with no chosen expert (padding, or min_experts=0) keeps all-zero weights instead of 0/0.
    return torch.where(total > 0, weights / total, torch.zeros_like(weights))


@dataclass(frozen=True)
class SoftmaxScoring:
    """Softmax over all experts; weights are the chosen probabilities, renormalised if the family does.

    Mixtral (always renormalises), Qwen2-MoE, Qwen3-MoE, OLMoE (renormalise iff norm_topk_prob).
    """

    renormalize: bool

    def max_candidates(self, num_experts: int) -> int:
        return num_experts

    def candidates(self, logits: torch.Tensor, cap: int, top=capped_candidates) -> Candidates:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (the same bits as logits.float() first)
        values, ids = top(probs, cap)
        return Candidates(values, ids, probs)

    def weights(self, logits: torch.Tensor, cand: Candidates, mask: torch.Tensor) -> torch.Tensor:
        chosen = cand.values * mask  # the chosen probabilities themselves
        return _renormalize(chosen) if self.renormalize else chosen

    @property
    def kernel_weights(self) -> int:
        """The compiled CPU op computes these weights itself (its weight_mode): 1 the chosen probabilities,
        2 renormalised over the chosen (summed in slot order, so equal to `weights` to float rounding)."""
        return 2 if self.renormalize else 1


ACTIVATIONS = {
    "softmax": lambda logits: torch.softmax(logits.float(), dim=-1),
    "sigmoid": lambda logits: torch.sigmoid(logits.float()),
}


@dataclass(frozen=True)
class BiasedScoring:
    """Scores over all experts, chosen by a selection-only bias and an optional group limit; weights from the
    unbiased scores, optionally renormalised, then scaled.

    DeepSeek-V3 and its descendants (sigmoid, bias, groups ranked by the sum of their two best biased scores,
    `topk_group` groups kept), DeepSeek-V2 (softmax; groups ranked by their best score), ERNIE 4.5 (softmax plus a
    bias, renormalised with a clamped denominator), MiniMax-M2, Laguna, LFM2-MoE and others (sigmoid, bias, no
    groups). Tokens compete on the biased scores; with no bias they are the family's scores themselves.
    Groups are masked with -inf. Mistral 4 and AXK2 fill them with 0.0 instead: the same choice whenever the
    allowed scores are positive (always for softmax, and for sigmoid unless a bias is below -score).
    """

    bias: torch.Tensor | None
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    scaling: float = 1.0
    activation: str = "sigmoid"
    group_score: str = "top2"  # "top2": sum of a group's two best choice scores; "max": its best one
    eps: float = 1e-20  # added to the renormalisation denominator ...
    min_total: float = 0.0  # ... or, when > 0, the denominator clamped below (ERNIE 4.5's moe_norm_min)
    norm_p: float | None = None  # divide by this p-norm instead of the sum (DBRX's moe_normalize_expert_weights)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {self.activation!r}")
        if self.group_score not in ("top2", "max"):
            raise ValueError(f"group_score must be 'top2' or 'max', not {self.group_score!r}")

    @property
    def grouped(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group

    def max_candidates(self, num_experts: int) -> int:
        return self.topk_group * (num_experts // self.n_group) if self.grouped else num_experts

    def _biased(self, logits: torch.Tensor):
        scores = ACTIVATIONS[self.activation](logits)
        choice = scores + self.bias if self.bias is not None else scores
        return scores, choice

    def candidates(self, logits: torch.Tensor, cap: int, top=capped_candidates) -> Candidates:
        scores, choice = self._biased(logits)
        n, experts = choice.shape
        if self.grouped:
            grouped = choice.view(n, self.n_group, experts // self.n_group)
            if self.group_score == "top2":
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            keep = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(experts // self.n_group, dim=1),
                                        float("-inf"))
        values, ids = top(choice, cap)
        return Candidates(values, ids, scores)

    def weights(self, logits: torch.Tensor, cand: Candidates, mask: torch.Tensor) -> torch.Tensor:
        chosen = cand.scores.gather(-1, cand.ids) * mask  # unbiased scores: the bias only selects
        if self.renormalize:
            chosen = _renormalize(chosen, eps=self.eps, min_total=self.min_total, p=self.norm_p)
        return chosen * self.scaling if self.scaling != 1.0 else chosen


@dataclass(frozen=True)
class ChosenSoftmaxScoring:
    """GPT-OSS, Granite-MoE, Aria, Cohere2-MoE (softmax): TopK on the logits, then softmax over the chosen
    logits only.

    Logits are not comparable across tokens (each token's can shift freely), so tokens compete on their
    softmax probabilities over all experts; within a token that order is the logits' order.
    """

    def max_candidates(self, num_experts: int) -> int:
        return num_experts

    def candidates(self, logits: torch.Tensor, cap: int, top=capped_candidates) -> Candidates:
        ids = top(logits, cap)[1]
        probs = torch.softmax(logits.float(), dim=-1)
        return Candidates(probs.gather(-1, ids), ids, logits)

    def weights(self, logits: torch.Tensor, cand: Candidates, mask: torch.Tensor) -> torch.Tensor:
        chosen = logits.gather(-1, cand.ids).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(chosen, dim=-1, dtype=logits.dtype)
        return torch.nan_to_num(weights, nan=0.0)  # a token with nothing chosen: all -inf -> NaN -> 0


SCORES = ("softmax", "sigmoid", "chosen_softmax")


def build_scoring(score: str, *, renormalize: bool = False, bias: torch.Tensor | None = None, n_group: int = 1,
                  topk_group: int = 1, group_score: str = "top2", scaling: float = 1.0, eps: float | None = None,
                  min_total: float = 0.0, norm_p: float | None = None):
    """The one builder of scoring objects. Each engine only translates its own inputs into this description
    (seqtopk/patches/table.py a transformers router's attributes, seqtopk/engines/vllm/router.py the fused-MoE
    factory's arguments); which object carries it is decided here.

    score: "softmax" or "sigmoid" over all experts, weights from those scores; "chosen_softmax": top-k on the
    logits, softmax over the chosen logits only. bias: selection-only bias. n_group / topk_group /
    group_score: group-limited top-k (groups ranked by their two best scores, "top2", or their best, "max").
    renormalize (with eps added, or the sum clamped below min_total, or a p-norm norm_p), then x scaling.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
    grouped = n_group > 1 and topk_group < n_group
    if score == "chosen_softmax":
        if bias is not None or grouped or renormalize or scaling != 1.0 or norm_p is not None:
            raise ValueError("chosen_softmax takes no bias, groups, renormalisation or scaling")
        return ChosenSoftmaxScoring()
    if (score == "softmax" and bias is None and not grouped and scaling == 1.0 and min_total == 0.0
            and norm_p is None and (eps is None or not renormalize)):
        return SoftmaxScoring(renormalize=renormalize)
    extra = {} if eps is None else {"eps": eps}
    return BiasedScoring(bias=bias, activation=score, n_group=n_group if grouped else 1,
                         topk_group=topk_group if grouped else 1, group_score=group_score,
                         renormalize=renormalize, scaling=scaling, min_total=min_total, norm_p=norm_p, **extra)
