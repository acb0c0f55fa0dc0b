"""The selection rules on small hand-checked cases, and their invariants on random ones."""

import pytest
import torch

from seqtopk.routing.counting import _bucketed_causal_counts, count_greater
from seqtopk.routing.rules import capped_candidates, pack, select_causal, select_sequence

INF = float("inf")


def counts(mask):
    return mask.sum(-1).tolist()


def test_sequence_rule_hand_checked():
    # K=1 over 3 tokens: budget 3. Top-3 capped scores overall are 0.9 (t0), 0.5 and 0.4 (t1).
    v = torch.tensor([[[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.34, 0.33, 0.33]]])
    assert counts(select_sequence(v, None, k=1, min_experts=0)) == [[1, 2, 0]]
    # The minimum gives t2 its best expert on top of the budget (3 + 1 pairs).
    assert counts(select_sequence(v, None, k=1, min_experts=1)) == [[1, 2, 1]]
    # Exact budget: forced minimums (3) use the whole budget of 3.
    assert counts(select_sequence(v, None, k=1, min_experts=1, exact_budget=True)) == [[1, 1, 1]]


def test_exact_ties_go_to_earlier_token_then_better_rank():
    # Three identical tokens (a repeated prompt token): six equal scores, budget 3.
    v = torch.full((1, 3, 2), 0.5)
    mask = select_sequence(v, None, k=1, min_experts=0)
    assert mask.int().tolist() == [[[1, 1], [1, 0], [0, 0]]]
    assert torch.equal(mask, select_sequence(v.clone(), None, k=1, min_experts=0))


def test_cap_equal_k_is_plain_topk():
    torch.manual_seed(0)
    scores = torch.randn(2, 9, 8).softmax(-1)
    values, _ = capped_candidates(scores, 3)
    assert select_sequence(values, None, k=3, min_experts=0).all()
    assert select_causal(values, None, k=3, min_experts=0).all()


@pytest.mark.parametrize("k,cap,min_experts", [(1, 3, 0), (2, 4, 1), (2, 4, 2), (3, 8, 1)])
def test_budgets(k, cap, min_experts):
    torch.manual_seed(k * 10 + cap)
    scores = torch.randn(3, 40, 8).softmax(-1)
    values, _ = capped_candidates(scores, cap)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, :7] = False
    valid[2, -11:] = False
    real = valid.sum(1)
    exact = select_sequence(values, valid, k, min_experts, exact_budget=True)
    assert exact.sum((1, 2)).tolist() == (real * k).tolist()
    loose = select_sequence(values, valid, k, min_experts)
    assert (loose.sum((1, 2)) >= real * k).all()
    if min_experts == 0:
        assert loose.sum((1, 2)).tolist() == (real * k).tolist()
    for mask in (exact, loose, select_causal(values, valid, k, min_experts)):
        assert not mask[~valid].any(), "padding took experts"
        per_token = mask.sum(-1)[valid]
        assert per_token.max() <= cap and per_token.min() >= min_experts


def test_padding_never_changes_a_sequence():
    torch.manual_seed(1)
    values, _ = capped_candidates(torch.randn(1, 12, 8).softmax(-1), 4)
    alone = select_sequence(values, None, k=2)
    pad = torch.zeros(1, 5, 4)
    left = select_sequence(torch.cat([pad, values], 1), torch.tensor([[False] * 5 + [True] * 12]), k=2)
    right = select_sequence(torch.cat([values, pad], 1), torch.tensor([[True] * 12 + [False] * 5]), k=2)
    assert torch.equal(left[:, 5:], alone) and torch.equal(right[:, :12], alone)
    c_alone = select_causal(values, None, k=2)
    c_left = select_causal(torch.cat([pad, values], 1), torch.tensor([[False] * 5 + [True] * 12]), k=2)
    assert torch.equal(c_left[:, 5:], c_alone)


def test_causal_first_token_takes_its_top_k():
    # With one token seen, the cut is its own K-th best score.
    v = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])
    assert counts(select_causal(v, None, k=2, min_experts=0)) == [[2]]


def test_causal_hand_checked_stream():
    # K=1, cap=2. t0: [0.6, 0.4] -> cut = 0.6 -> 1 expert.
    # t1: [0.9, 0.8]; pool {0.6, 0.4, 0.9, 0.8}, m=2 -> cut = 2nd largest = 0.8 -> 2 experts.
    # t2: [0.3, 0.2]; pool adds {0.3, 0.2}, m=3 -> cut = 3rd largest = 0.6 -> none above; minimum 1.
    v = torch.tensor([[[0.6, 0.4], [0.9, 0.8], [0.3, 0.2]]])
    assert counts(select_causal(v, None, k=1, min_experts=0)) == [[1, 2, 0]]
    assert counts(select_causal(v, None, k=1, min_experts=1)) == [[1, 2, 1]]


@pytest.mark.parametrize("exact_budget", [False, True])
def test_causal_one_shot_equals_chunks_and_steps(exact_budget):
    torch.manual_seed(2)
    values, _ = capped_candidates(torch.randn(3, 150, 16).softmax(-1), 6)
    valid = torch.ones(3, 150, dtype=torch.bool)
    valid[1, :20] = False
    one_shot = select_causal(values, valid, 2, 1, exact_budget)
    for chunk in (1, 7, 64):
        parts = []
        for start in range(0, 150, chunk):
            stop = min(start + chunk, 150)
            history = values[:, :start].masked_fill(~valid[:, :start, None], -INF) if start else None
            parts.append(select_causal(values[:, start:stop], valid[:, start:stop], 2, 1, exact_budget,
                                       history=history))
        assert torch.equal(torch.cat(parts, 1), one_shot), f"chunk={chunk}"


def test_causal_rows_are_independent():
    torch.manual_seed(3)
    values, _ = capped_candidates(torch.randn(4, 60, 8).softmax(-1), 4)
    together = select_causal(values, None, k=2)
    for b in range(4):
        assert torch.equal(select_causal(values[b:b + 1], None, k=2), together[b:b + 1])


def test_bucketed_counts_match_brute_force_with_ties():
    torch.manual_seed(4)
    for _ in range(3):
        chunk = (torch.rand(2, 97, 5) * 7).round() / 7  # coarse values force many exact ties
        earlier = (torch.rand(2, 53) * 7).round() / 7
        chunk[0, 3] = -INF
        earlier[1, :4] = -INF
        expected = torch.zeros(2, 97, 5, dtype=torch.long)
        for b in range(2):
            for t in range(97):
                pool = torch.cat([earlier[b], chunk[b, : t + 1].reshape(-1)])
                expected[b, t] = (pool[None, :] > chunk[b, t][:, None]).sum(-1)
        assert torch.equal(_bucketed_causal_counts(earlier, chunk), expected)


@pytest.mark.parametrize("pool_size,queries_size", [(3000, 6000), (3000, 10), (50, 40)])
def test_count_greater_paths_match_brute_force(pool_size, queries_size):
    torch.manual_seed(5)
    pool = (torch.rand(2, pool_size) * 50).round()  # coarse values: many exact ties
    pool[0, :7] = -INF
    queries = (torch.rand(2, queries_size) * 50).round()
    expected = torch.stack([(pool[b][None, :] > queries[b][:, None]).sum(-1) for b in range(2)])
    assert torch.equal(count_greater(pool, queries), expected)


def test_pack_marks_unchosen_slots_by_convention():
    ids = torch.tensor([[3, 1, 0]])
    chosen = torch.tensor([[True, False, True]])
    assert pack(ids, chosen).tolist() == [[3, -1, 0]]
    assert pack(ids, chosen, "repeat_best").tolist() == [[3, 3, 0]]
    with pytest.raises(ValueError, match="unchosen must be one of"):
        pack(ids, chosen, "zero")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU selection path)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sequence_cut_equals_cpu_with_ties_padding_and_signed_zeros(dtype):
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(3, 40, 6, generator=gen).round(decimals=1)  # many exact ties
    values[0, 5:9] = values[0, 4]  # repeated tokens
    values[1, :, -2:] = float("-inf")  # fewer finite candidates than the cap
    values[2, 10:20] = torch.where(torch.rand(10, 6, generator=gen) < 0.5, -0.0, 0.0)
    values = values.sort(dim=-1, descending=True).values.to(dtype)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    valid[2, 31:] = False  # right padding
    for k, min_experts, exact in [(2, 1, True), (2, 0, False), (3, 1, False)]:
        cpu = select_sequence(values.float(), valid, k, min_experts, exact)
        gpu = select_sequence(values.cuda(), valid.cuda(), k, min_experts, exact)
        assert torch.equal(gpu.cpu(), cpu), (k, min_experts, exact)


def test_which_rule_routes_each_token():
    from seqtopk.config import ResolvedConfig
    from seqtopk.routing.rules import TokenRules, rule_for

    def cfg(prefill, decode):
        return ResolvedConfig(k=2, cap=4, min_experts=1, exact_budget=False, prefill=prefill, decode=decode)

    # (fresh, generated) -> rule: fresh prompts follow `prefill`, generated tokens `decode`, the rest stream.
    expected = {("sequence", "expert_cache"): ("sequence", "causal", "causal"),
                ("causal", "expert_cache"): ("causal", "causal", "causal"),
                ("sequence", "topk"): ("sequence", "causal", "topk"),
                ("causal", "topk"): ("causal", "causal", "topk")}
    for (prefill, decode), (fresh_rule, continued_rule, generated_rule) in expected.items():
        settings = cfg(prefill, decode)
        assert rule_for(settings, fresh=True, generated=False) == fresh_rule
        assert rule_for(settings, fresh=False, generated=False) == continued_rule
        assert rule_for(settings, fresh=False, generated=True) == generated_rule
    fresh = torch.tensor([True, True, False, False, False])
    generated = torch.tensor([False, False, False, True, True])
    mixed = TokenRules.per_token(cfg("sequence", "topk"), fresh, generated, longest_chunk=2)
    assert mixed.present == ("sequence", "causal", "topk") and mixed.codes.tolist() == [0, 0, 1, 2, 2]
    assert mixed.tokens("topk").tolist() == [False, False, False, True, True]
    single = TokenRules.per_token(cfg("sequence", "topk"), fresh, generated, longest_chunk=1)
    assert single.present == ("causal", "topk") and single.codes.tolist() == [1, 1, 1, 2, 2]
    uniform = TokenRules.per_token(cfg("causal", "expert_cache"), fresh, generated, longest_chunk=2)
    assert uniform.present == ("causal",) and uniform.codes is None and uniform.tokens("causal") is None
    assert TokenRules.for_forward(cfg("sequence", "topk"), continuing=True).present == ("topk",)
    with pytest.raises(ValueError, match="rule must be one of"):
        TokenRules.uniform("greedy")


def test_candidates_are_best_first_with_ties_to_the_lower_expert():
    scores = torch.tensor([[1.0, 2.0, 2.0, -0.0, 0.0, 3.0, -INF, float("nan")]])
    values, ids = capped_candidates(scores, 8)
    assert ids.tolist() == [[7, 5, 1, 2, 0, 3, 4, 6]]  # NaN above everything, -0.0 equal to +0.0
    assert torch.equal(values.view(torch.int32), scores.gather(-1, ids).view(torch.int32))
    # Against a plain sort by (score descending, id ascending), on bf16-like scores full of exact ties.
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        scores = torch.randint(-4, 5, (40, 12), generator=gen).to(dtype) / 4
        values, ids = capped_candidates(scores, 5)
        for row, got in zip(scores.tolist(), ids.tolist()):
            assert got == sorted(range(12), key=lambda e: (-row[e], e))[:5], dtype
        assert values.dtype == dtype and torch.equal(values, scores.gather(-1, ids))
