"""Reduced and fractional budgets (SPEC section 5): B(m) = floor(m*k + 1/2) pairs for m real tokens, in every
rule, on hand-checked cases; the settings' validation; streaming = causal prefill at a fractional k."""

import pytest
import torch

from seqtopk.config import SeqTopKConfig
from seqtopk.budget import budget_split
from seqtopk.routing.rules import capped_candidates, select_causal, select_sequence

INF = float("inf")


def counts(mask):
    return mask.sum(-1).tolist()


@pytest.mark.parametrize("k,expected", [(1.5, [2, 3, 5, 6, 8]), (0.5, [1, 1, 2, 2, 3]), (0.25, [0, 1, 1, 1, 1]),
                                        (2, [2, 4, 6, 8, 10]), (1 / 3, [0, 1, 1, 1, 2])])
def test_budget_is_floor_of_m_k_plus_half(k, expected):
    split = budget_split(k, 8, 0, False)
    assert [split.pairs(m) for m in range(1, 6)] == expected
    assert split.pairs(torch.arange(1, 6)).tolist() == expected  # the same on tensors


def test_sequence_rule_fractional_hand_checked():
    # k=1.5 over 3 tokens: B(3) = floor(4.5 + 0.5) = 5 pairs. Capped scores, best first:
    # t0 [0.9, 0.05, 0.05], t1 [0.5, 0.4, 0.1], t2 [0.34, 0.33, 0.33]: the 5 largest are 0.9, 0.5, 0.4, 0.34, 0.33
    # and 0.33 ties twice at the cut: the earlier column wins.
    v = torch.tensor([[[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.34, 0.33, 0.33]]])
    assert select_sequence(v, None, k=1.5, min_experts=0).int().tolist() == [[[1, 0, 0], [1, 1, 0], [1, 1, 0]]]
    # k=0.5: B(3) = 2 pairs (0.9 and 0.5); t2 takes nothing without a minimum, its best with min_experts=1.
    assert counts(select_sequence(v, None, k=0.5, min_experts=0)) == [[1, 1, 0]]
    assert counts(select_sequence(v, None, k=0.5, min_experts=0, exact_budget=True)) == [[1, 1, 0]]
    # exact budget at k=1.5, min 1: forced 3 pairs, B(3) - 3 = 2 more among the rest: 0.4 (t1) and 0.33 (t2).
    assert counts(select_sequence(v, None, k=1.5, min_experts=1, exact_budget=True)) == [[1, 2, 2]]


def test_fractional_padding_counts_only_real_tokens():
    # Two real tokens at k=1.5: B(2) = 3 pairs, whatever the padding around them.
    torch.manual_seed(0)
    values, _ = capped_candidates(torch.randn(1, 2, 8).softmax(-1), 4)
    alone = select_sequence(values, None, k=1.5, min_experts=0)
    assert alone.sum() == 3
    pad = torch.zeros(1, 3, 4)
    padded = torch.cat([pad, values, pad], 1)
    valid = torch.tensor([[False] * 3 + [True] * 2 + [False] * 3])
    mask = select_sequence(padded, valid, k=1.5, min_experts=0)
    assert torch.equal(mask[:, 3:5], alone) and not mask[~valid].any()
    # Rows of different lengths in one batch each spend their own B(n).
    batch = torch.randn(3, 7, 8).softmax(-1)
    values, _ = capped_candidates(batch, 4)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, :2] = False  # n = 5
    valid[2, 4:] = False  # n = 4
    spent = select_sequence(values, valid, k=1.5, min_experts=0).sum((1, 2)).tolist()
    assert spent == [11, 8, 6]  # floor(10.5 + .5), floor(7.5 + .5), floor(6 + .5)


def test_causal_fractional_hand_checked_stream():
    # k=0.5, cap=2: budgets B(1..4) = 1, 1, 2, 2.
    # t0 [0.6, 0.4]: pool {0.6, 0.4}, cut = 1st largest 0.6 -> 1.
    # t1 [0.3, 0.2]: pool adds both, B(2)=1: cut 0.6 -> 0.
    # t2 [0.9, 0.5]: pool {0.9, 0.6, 0.5, ...}, B(3)=2: cut 0.6 -> 0.9 only.
    # t3 [0.7, 0.65]: pool {0.9, 0.7, 0.65, 0.6, ...}, B(4)=2: cut 0.7 -> 0.7 only.
    v = torch.tensor([[[0.6, 0.4], [0.3, 0.2], [0.9, 0.5], [0.7, 0.65]]])
    assert counts(select_causal(v, None, k=0.5, min_experts=0)) == [[1, 0, 1, 1]]


@pytest.mark.parametrize("k,min_experts,exact_budget", [(1.5, 1, False), (0.75, 0, False), (2.25, 1, True)])
def test_causal_fractional_one_shot_equals_chunks_and_steps(k, min_experts, exact_budget):
    torch.manual_seed(2)
    values, _ = capped_candidates(torch.randn(3, 90, 16).softmax(-1), 5)
    valid = torch.ones(3, 90, dtype=torch.bool)
    valid[1, :20] = False
    one_shot = select_causal(values, valid, k, min_experts, exact_budget)
    for chunk in (1, 7, 64):
        parts = []
        for start in range(0, 90, chunk):
            stop = min(start + chunk, 90)
            history = values[:, :start].masked_fill(~valid[:, :start, None], -INF) if start else None
            parts.append(select_causal(values[:, start:stop], valid[:, start:stop], k, min_experts, exact_budget,
                                       history=history))
        assert torch.equal(torch.cat(parts, 1), one_shot), f"chunk={chunk}"
    # Over the whole prefix the causal rule keeps close to B(m) pairs (each token's cut is its own prefix's).
    spent = one_shot.sum((1, 2)).float()
    assert spent.sub(valid.sum(1) * k).abs().max() <= valid.sum(1).max() * 0.5


def test_exact_fractional_budget_is_exact():
    torch.manual_seed(4)
    values, _ = capped_candidates(torch.randn(2, 33, 12).softmax(-1), 5)
    for k in (0.5, 1.25, 2.7):
        mask = select_sequence(values, None, k, min_experts=0 if k < 1 else 1, exact_budget=True)
        assert mask.sum((1, 2)).tolist() == [int(33 * k + 0.5)] * 2


def test_settings_validation():
    assert SeqTopKConfig(k=1.5).resolve(2, 16).cap == 4  # ceil(k) + 2
    assert SeqTopKConfig(k=0.5).resolve(2, 16).min_experts == 0  # below one expert per token: none forced
    assert SeqTopKConfig(k=1.5).resolve(2, 16).min_experts == 1
    assert SeqTopKConfig(k=4.0).resolve(2, 16).k == 4 and isinstance(SeqTopKConfig(k=4.0).resolve(2, 16).k, int)
    with pytest.raises(ValueError, match="set min_experts=0"):
        SeqTopKConfig(k=0.5, min_experts=1)
    with pytest.raises(ValueError, match=">= 0.1"):
        SeqTopKConfig(k=0.05)
    with pytest.raises(ValueError, match="multiple of 1/1000"):
        SeqTopKConfig(k=1.23456)
    with pytest.raises(ValueError, match="decode='topk'"):
        SeqTopKConfig(k=1.5, decode="topk")
    with pytest.raises(ValueError, match="must be a number"):
        SeqTopKConfig(k="1.5")
    with pytest.raises(ValueError, match="cap"):
        SeqTopKConfig(k=2.5, cap=2)
    assert SeqTopKConfig.from_dict({"k": 0.75}).resolve(2, 16).k == 0.75
