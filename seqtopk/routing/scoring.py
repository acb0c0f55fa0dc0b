"""Each MoE family's own scoring, split into the part SeqTopK replaces (selection) and the part it keeps.

A scoring object answers three questions for router logits [N, E]:
- candidates(logits, cap) -> Candidates: each token's best `cap` experts (ids) and the scores they compete
  with across the sequence (values), best first, plus the family's scores for the weights (computed once);
- max_candidates(num_experts): how many experts one token can choose from at all;
- weights(logits, candidates, mask): the combine weights of the chosen slots (0 for unchosen ones), by the
  family's own convention.
Pure torch; used by the transformers patches and the vLLM adapter alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Candidates(NamedTuple):
    values: torch.Tensor  # [N, cap] scores the tokens compete with, best first
    ids: torch.Tensor  # [N, cap] expert ids
    scores: torch.Tensor  # [N, E] the family's scores the weights are taken from


def _renormalize(weights: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    total = weights.sum(dim=-1, keepdim=True) + eps
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

    def candidates(self, logits: torch.Tensor, cap: int) -> Candidates:
        probs = torch.softmax(logits.float(), dim=-1)
        values, ids = torch.topk(probs, cap, dim=-1)
        return Candidates(values, ids, probs)

    def weights(self, logits: torch.Tensor, cand: Candidates, mask: torch.Tensor) -> torch.Tensor:
        chosen = cand.values * mask  # the chosen probabilities themselves
        return _renormalize(chosen) if self.renormalize else chosen


@dataclass(frozen=True)
class SigmoidGroupScoring:
    """DeepSeek-V3: sigmoid scores; a selection-only bias; group-limited choice; scaled weights.

    A token may only choose experts in its `topk_group` best groups (group score = sum of its two best
    biased scores). Tokens compete on the biased scores; weights use the unbiased ones.
    """

    bias: torch.Tensor | None
    n_group: int
    topk_group: int
    renormalize: bool
    scaling: float

    def max_candidates(self, num_experts: int) -> int:
        return self.topk_group * (num_experts // self.n_group)

    def _biased(self, logits: torch.Tensor):
        scores = torch.sigmoid(logits.float())
        choice = scores + self.bias if self.bias is not None else scores
        return scores, choice

    def candidates(self, logits: torch.Tensor, cap: int) -> Candidates:
        scores, choice = self._biased(logits)
        n, experts = choice.shape
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(n, self.n_group, experts // self.n_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            keep = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(experts // self.n_group, dim=1),
                                        float("-inf"))
        values, ids = torch.topk(choice, cap, dim=-1)
        return Candidates(values, ids, scores)

    def weights(self, logits: torch.Tensor, cand: Candidates, mask: torch.Tensor) -> torch.Tensor:
        chosen = cand.scores.gather(-1, cand.ids) * mask  # unbiased scores: the bias only selects
        if self.renormalize:
            chosen = _renormalize(chosen, eps=1e-20)
        return chosen * self.scaling


@dataclass(frozen=True)
class ChosenSoftmaxScoring:
    """GPT-OSS and Granite-MoE: TopK on the logits, then softmax over the chosen logits only.

    Logits are not comparable across tokens (each token's can shift freely), so tokens compete on their
    softmax probabilities over all experts; within a token that order is the logits' order.
    """

    def max_candidates(self, num_experts: int) -> int:
        return num_experts

    def candidates(self, logits: torch.Tensor, cap: int) -> Candidates:
        ids = torch.topk(logits, cap, dim=-1).indices
        probs = torch.softmax(logits.float(), dim=-1)
        return Candidates(probs.gather(-1, ids), ids, logits)

    def weights(self, logits: torch.Tensor, cand: Candidates, mask: torch.Tensor) -> torch.Tensor:
        chosen = logits.gather(-1, cand.ids).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(chosen, dim=-1, dtype=logits.dtype)
        return torch.nan_to_num(weights, nan=0.0)  # a token with nothing chosen: all -inf -> NaN -> 0
