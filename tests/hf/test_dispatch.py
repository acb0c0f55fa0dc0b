"""Chosen-pair dispatch: the row plan and the filled slots compute the same MoE output as the stock kernel."""

import pytest
import torch

import seqtopk
from seqtopk.engines.hf import experts as hf_dispatch
from seqtopk.routing.dispatch import combine_rows, plan_pairs, row_count


def random_choice(tokens, cap, experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:cap] for _ in range(tokens)])
    mask = torch.rand(tokens, cap, generator=gen) < 0.6
    mask[:, 0] = True
    weights = torch.rand(tokens, cap, generator=gen) * mask
    return ids, weights, mask


def test_plan_lists_chosen_slots_token_major_with_spare_rows_last():
    ids = torch.tensor([[3, 1, 2], [0, 2, 1]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    plan = plan_pairs(ids, weights, mask, rows=6)  # 4 chosen + 2 spare rows
    assert plan.token.tolist()[:4] == [0, 0, 1, 1]
    assert plan.expert.tolist() == [3, 2, 0, 2, 3, 3]  # spare rows reuse the first chosen pair's expert
    assert plan.weight.tolist() == pytest.approx([0.5, 0.2, 0.6, 0.4, 0.0, 0.0])
    rows = torch.arange(6, dtype=torch.float32).unsqueeze(1) + 1  # row r holds value r + 1
    combined = combine_rows(rows, plan).squeeze(1)
    assert combined.tolist() == pytest.approx([0.5 * 1 + 0.2 * 2, 0.6 * 3 + 0.4 * 4])
    assert row_count(mask, 6) == 6 and row_count(mask, None) == 4  # on the CPU: the true count
    # Under the "drop" convention an unchosen first slot is -1; spare rows still name a real chosen expert.
    dropped = plan_pairs(torch.tensor([[-1, 5], [4, -1]]), weights[:, :2], torch.tensor([[False, True], [True, False]]), 4)
    assert dropped.expert.tolist() == [5, 4, 5, 5]


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_row_plan_matches_the_stock_kernel(load_tiny, family, implementation):
    model, _ = load_tiny(family)
    model.set_experts_implementation(implementation)
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    tokens, cap = 300, 4
    ids, weights, mask = random_choice(tokens, cap, experts.num_experts)
    hidden = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        filled = torch.where(mask, ids, ids[:, :1])
        reference = experts(hidden, filled, weights * mask)  # stock kernel, unchosen slots weigh 0
        for rows in (int(mask.sum()), tokens * cap):  # exact count, and a static bound with spare rows
            plan = plan_pairs(ids, weights, mask, rows)
            got = hf_dispatch.run_plan(experts, experts.forward, hidden, plan)
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_static_row_bound_matches_the_exact_count(load_tiny):
    import seqtopk.engines.hf.patch as hf

    model, _ = load_tiny("olmoe")
    x = torch.randint(3, 259, (2, 700), generator=torch.Generator().manual_seed(3))
    seqtopk.patch(model)  # no exact budget: each step counts its rows
    with torch.no_grad():
        counted = model(x).logits
        original = hf.row_count
        try:
            hf.row_count = lambda mask, exact: mask.numel()  # the accelerator's static bound, spare rows and all
            bounded = model(x).logits
        finally:
            hf.row_count = original
    torch.testing.assert_close(bounded, counted, rtol=1e-5, atol=1e-5)
