"""Chosen-pair dispatch: row plans, count groups and the combine compute what the stock kernel computes on the
filled slots, on the compiled CPU ops and on their torch references."""

import pytest
import torch

import seqtopk
from seqtopk.engines.hf import experts as hf_dispatch
from seqtopk.kernels import backend
from seqtopk.kernels.paths import combine, count_groups, plan
from seqtopk.routing.dispatch import plan_pairs, row_count


def random_choice(tokens, cap, experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:cap] for _ in range(tokens)])
    mask = torch.rand(tokens, cap, generator=gen) < 0.6
    mask[:, 0] = True
    mask[3] = False  # a token with nothing chosen (min_experts=0, or padding)
    weights = torch.rand(tokens, cap, generator=gen) * mask
    return ids, weights, mask


def test_plan_lists_chosen_slots_token_major_with_spare_rows_last():
    ids = torch.tensor([[3, 1, 2], [0, 2, 1]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    pairs = plan_pairs(ids, weights, mask, rows=6)  # 4 chosen + 2 spare rows
    assert pairs.token.tolist()[:4] == [0, 0, 1, 1]
    assert pairs.expert.tolist() == [3, 2, 0, 2, 3, 3]  # spare rows reuse the first chosen pair's expert
    assert pairs.slot_row.tolist() == [[0, -1, 1], [2, 3, -1]]
    rows = torch.arange(6, dtype=torch.float32).unsqueeze(1) + 1  # row r holds value r + 1
    with backend.forced(backend.TORCH):
        combined = combine(rows, pairs).squeeze(1)
    assert combined.tolist() == pytest.approx([0.5 * 1 + 0.2 * 2, 0.6 * 3 + 0.4 * 4])
    assert row_count(mask, 6) == 6 and row_count(mask, None) == 4  # on the CPU: the true count
    # Under the "drop" convention an unchosen first slot is -1; spare rows still name a real chosen expert.
    dropped = plan_pairs(torch.tensor([[-1, 5], [4, -1]]), weights[:, :2], torch.tensor([[False, True], [True, False]]), 4)
    assert dropped.expert.tolist() == [5, 4, 5, 5]


def test_compiled_plan_is_the_torch_plan_sorted_by_expert(compiled_kernels):
    ids, weights, mask = random_choice(200, 6, 16)
    compiled_plan = plan(ids, weights, mask, 16)
    with backend.forced(backend.TORCH):
        reference = plan(ids, weights, mask, 16).by_expert(16)
    for name in ("token", "expert", "slot_row", "expert_end"):
        assert torch.equal(getattr(compiled_plan, name).long(), getattr(reference, name).long()), name
    rows = torch.randn(compiled_plan.rows, 24, dtype=torch.bfloat16)
    with backend.forced(backend.TORCH):
        expected = combine(rows, reference)
    torch.testing.assert_close(combine(rows, compiled_plan), expected, rtol=1e-2, atol=1e-2)
    assert not combine(rows.float(), compiled_plan)[3].any()  # nothing chosen: zeros


@pytest.mark.parametrize("call_rows", [0.0, 50.0, 1e6])
def test_count_groups_compiled_equals_torch(call_rows, compiled_kernels):
    ids, weights, mask = random_choice(300, 8, 32, seed=4)
    kernel = count_groups(ids, weights, mask, 32, call_rows)
    with backend.forced(backend.TORCH):
        reference = count_groups(ids, weights, mask, 32, call_rows)
    assert len(kernel) == len(reference)
    if call_rows >= 1e6:
        assert len(kernel) == 1  # one call, every token padded to the largest count
    for got, want in zip(kernel, reference):
        for a, b in zip(got, want):
            assert torch.equal(a.long() if a.dtype != torch.float32 else a, b.long() if b.dtype != torch.float32 else b)
    covered = torch.cat([g[0] for g in kernel]).sort().values
    assert torch.equal(covered, torch.nonzero(mask.any(dim=1)).squeeze(1))  # every token that chose, once
    for tokens, group_ids, group_weights in kernel:
        for t, row_ids, row_weights in zip(tokens.tolist(), group_ids, group_weights):
            chosen = [(int(e), float(w)) for e, w in zip(ids[t][mask[t]], weights[t][mask[t]])]
            n = len(chosen)
            assert [(int(e), float(w)) for e, w in zip(row_ids[:n], row_weights[:n])] == chosen  # in slot order
            assert (row_ids[n:] == row_ids[0]).all() and not row_weights[n:].any()  # padding: first expert, weight 0


@pytest.mark.parametrize("path", [backend.CPU_KERNELS, backend.TORCH])
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_row_plan_matches_the_stock_kernel(load_tiny, family, implementation, path, request):
    if path == backend.CPU_KERNELS:  # (forced() would quietly run the torch reference without them)
        request.getfixturevalue("compiled_kernels")
    model, _ = load_tiny(family)
    model.set_experts_implementation(implementation)
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    tokens, cap = 300, 4
    ids, weights, mask = random_choice(tokens, cap, experts.num_experts)
    hidden = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), backend.forced(path):
        filled = torch.where(mask, ids, ids[:, :1])
        reference = experts(hidden, filled, weights * mask)  # stock kernel, unchosen slots weigh 0
        for rows in (None, tokens * cap):  # the true count, and a static bound with spare rows
            pairs = plan(ids, weights, mask, experts.num_experts) if rows is None else plan_pairs(ids, weights, mask, rows)
            got = hf_dispatch.run_plan(experts, experts.forward, hidden, pairs)
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_static_row_bound_matches_the_exact_count(load_tiny):
    import seqtopk.routing.dispatch as dispatch

    model, _ = load_tiny("olmoe")
    x = torch.randint(3, 259, (2, 700), generator=torch.Generator().manual_seed(3))
    seqtopk.patch(model)  # no exact budget: each step counts its rows
    with torch.no_grad(), backend.forced(backend.TORCH):
        counted = model(x).logits
        original = dispatch.row_count
        try:
            dispatch.row_count = lambda mask, exact: mask.numel()  # the accelerator's static bound, spare rows and all
            bounded = model(x).logits
        finally:
            dispatch.row_count = original
    torch.testing.assert_close(bounded, counted, rtol=1e-5, atol=1e-5)
