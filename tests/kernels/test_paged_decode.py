"""The compiled CPU decode kernel (seqtopk/kernels/cpu/paged_decode.cpp) against the torch streaming rule.

Same decisions, slot for slot, on paged histories with exact ties at the cut, padding (-inf) entries,
histories spread over scattered blocks, a budget split by exact_budget and min_experts, padding tokens past
the last row, and a dense buffer whose history length differs from its real-token count (transformers'
left padding). The kernel is built here if the set-up did not build it (about half a minute).
"""

import pytest
import torch

from seqtopk.config import SeqTopKConfig
from seqtopk.kernels import compiled
from seqtopk.routing.paged import PagedLayout, gather_paged, history_slots
from seqtopk.routing.ragged import ragged_batch, select_ragged
from seqtopk.routing.rules import TokenRules, budget_split, select_causal

CAP, K, BLOCK = 6, 4, 4


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not compiled.load():
        compiled.build()
    assert compiled.paged_decode_available(torch.device("cpu")), compiled.status()


def paged_case(seed: int, rows: int, levels: int | None):
    """A store holding `rows` histories in shuffled blocks; values drawn from `levels` distinct numbers
    (many exact ties) or continuous."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, 23, (rows,), generator=gen)
    context[0] = 0
    blocks_per_row = 23 // BLOCK + 1
    order = torch.randperm(rows * blocks_per_row, generator=gen)
    table = order.view(rows, blocks_per_row).int()
    slots = rows * blocks_per_row * BLOCK + 1
    def draw(*shape):
        if levels is None:
            return torch.rand(*shape, generator=gen)
        return torch.randint(1, levels + 1, shape, generator=gen).float() / levels
    store = draw(slots, CAP).sort(dim=-1, descending=True).values
    store[torch.rand(slots, generator=gen) < 0.05] = float("-inf")  # some padding entries
    values = draw(rows, CAP).sort(dim=-1, descending=True).values
    return values, store, table, context


@pytest.mark.parametrize("levels", [None, 3, 7])
@pytest.mark.parametrize("min_experts,exact", [(1, False), (0, False), (1, True), (2, True), (2, False)])
def test_kernel_equals_torch_rule(levels, min_experts, exact):
    for seed in range(4):
        values, store, table, context = paged_case(seed, rows=9, levels=levels)
        layout = PagedLayout(table, BLOCK, context, int(context.max()), store.shape[0])
        history = layout.of(store)
        seen = context.clone()
        seen[1] = max(int(seen[1]) - 2, 0)  # fewer real earlier tokens than history slots (left padding)
        reference = select_causal(values.unsqueeze(1), None, K, min_experts, exact,
                                  history.gather(), seen).squeeze(1)
        kernel = select_causal(values.unsqueeze(1), None, K, min_experts, exact, history, seen).squeeze(1)
        assert torch.equal(kernel, reference), (seed, levels)


def test_a_tie_at_the_cut_is_not_counted_as_greater():
    # 4 earlier tokens beat everything (24 values), 1 earlier token has exactly this token's scores.
    # With 4 real earlier tokens and k=5 the budget is 5 * 5 = 25: the best candidate has 24 strictly
    # greater values (its tie does not count) and is taken; counting the tie as greater would drop it.
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1, 0.05]])
    store = torch.full((9, CAP), float("-inf"))
    store[:4] = 1.0
    store[4] = values
    layout = PagedLayout(torch.tensor([[0, 1]], dtype=torch.int32), BLOCK, torch.tensor([5]), 5, 9)
    seen = torch.tensor([4])
    reference = select_causal(values.unsqueeze(1), None, 5, 0, False, layout.of(store).gather(), seen)
    kernel = select_causal(values.unsqueeze(1), None, 5, 0, False, layout.of(store), seen)
    expected = torch.tensor([[[True, False, False, False, False, False]]])
    assert torch.equal(reference, expected) and torch.equal(kernel, expected)


def test_packed_decode_step_with_padding_tokens():
    """select_ragged on a one-token step (as vLLM runs it): kernel and torch agree, padding takes nothing."""
    values, store, table, context = paged_case(11, rows=6, levels=5)
    cfg = SeqTopKConfig(k=K, cap=CAP).resolve(K, 16)
    tokens = 8  # 2 padding tokens past the 6 rows
    padded = torch.cat([values, torch.rand(2, CAP).sort(-1, descending=True).values])
    batch = ragged_batch(torch.arange(7), context + 1, tokens, 1)
    generated = torch.ones(tokens, dtype=torch.bool)
    for decode in ("expert_cache", "topk"):
        cfg = SeqTopKConfig(k=K, cap=CAP, decode=decode).resolve(K, 16)
        rules = TokenRules.per_token(cfg, torch.zeros(tokens, dtype=torch.bool), generated, 1)
        layout = PagedLayout(table, BLOCK, batch.context, int(batch.context.max()), store.shape[0])
        with_kernel = select_ragged(padded, batch, rules, cfg, layout.of(store))
        with_torch = select_ragged(padded, batch, rules, cfg, layout.of(store).gather())
        assert torch.equal(with_kernel, with_torch)
        assert not with_kernel[6:].any()


def test_dense_buffer_is_one_block_per_row():
    """transformers keeps [B, S, C] buffers: PagedLayout.dense reads them through the same kernel."""
    gen = torch.Generator().manual_seed(3)
    buffer = torch.full((3, 16, CAP), float("-inf"))
    buffer[:, :9] = torch.rand(3, 9, CAP, generator=gen).sort(-1, descending=True).values
    buffer[2, :4] = float("-inf")  # left padding of row 2
    values = torch.rand(3, CAP, generator=gen).sort(-1, descending=True).values
    seen = torch.tensor([9, 9, 5])
    layout = PagedLayout.dense(buffer, 9)
    kernel = layout.of(buffer.view(-1, CAP)).single_token_choice(values, seen, budget_split(K, CAP, 1, False))
    reference = select_causal(values.unsqueeze(1), None, K, 1, False, buffer[:, :9], seen).squeeze(1)
    assert kernel is not None and torch.equal(kernel, reference)
    slots, live = history_slots(layout.block_table, layout.block_size, layout.length, 9, layout.num_slots)
    assert torch.equal(gather_paged(buffer.view(-1, CAP), slots, live), buffer[:, :9])
