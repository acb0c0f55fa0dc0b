"""The compiled CPU routing op (seqtopk/kernels/cpu/route.cpp) against the torch reference (seqtopk.routing.rules).

Same decisions, slot for slot, for every rule: the sequence rule with padding and exact ties at the cut; the
causal rule over chunks against paged histories in shuffled blocks; mixed rules in one packed step (fresh
prompts, chunk continuations, generated tokens, TopK); and decode steps answered from the per-sequence bands,
over hundreds of steps whose cut drifts out of the band and back, with ties, -inf entries and a history
rewritten behind the band's back. The kernels are the ones set-up built (`seqtopk kernels --build`): without
them these tests skip, or fail under CI=true (tests/conftest.py's compiled_kernels); they never build them.
"""

import pytest
import torch

from seqtopk.config import SeqTopKConfig
from seqtopk.kernels import backend, compiled
from seqtopk.kernels.paths import new_bands, route
from seqtopk.routing.paged import PagedLayout, mark_stale
from seqtopk.routing.ragged import ragged_batch
from seqtopk.routing.router import DenseLayout, RouteStats
from seqtopk.routing.rules import TokenRules
from seqtopk.routing.scoring import BiasedScoring, SoftmaxScoring

E, K, CAP = 16, 4, 6
SPLITS = [(1, False), (0, False), (1, True), (2, True), (2, False)]  # min_experts, exact_budget
# Fractional budgets (B(m) = floor(m*k + 1/2)): k, min_experts, exact_budget
FRACTIONAL = [(2.5, 1, False), (1.75, 1, True), (0.6, 0, False), (0.5, 0, True)]


@pytest.fixture(scope="module", autouse=True)
def kernel(compiled_kernels):
    assert backend.backend_for(torch.device("cpu")) == backend.CPU_KERNELS, compiled.status()


def logits_for(tokens: int, gen, levels: int | None) -> torch.Tensor:
    """Router logits; with `levels`, drawn from a few values so that many scores tie exactly."""
    if levels is None:
        return torch.randn(tokens, E, generator=gen) * 2
    return torch.randint(0, levels, (tokens, E), generator=gen).float()


def both(fn):
    """fn() on the torch reference and on the compiled op."""
    with backend.forced(backend.TORCH):
        reference = fn()
    return reference, fn()


def assert_same(reference, kernel):
    assert torch.equal(reference.mask, kernel.mask)
    assert torch.equal(reference.ids, kernel.ids)
    torch.testing.assert_close(kernel.weights, reference.weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("levels", [None, 2, 5])
@pytest.mark.parametrize("k,min_experts,exact", [(K, *split) for split in SPLITS] + FRACTIONAL)
def test_sequence_rule_with_padding_and_ties(levels, k, min_experts, exact):
    gen = torch.Generator().manual_seed(levels or 0)
    batch, tokens = 4, 23
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    valid[2, -4:] = False  # right padding
    valid[3, :] = False  # all padding
    cfg = SeqTopKConfig(k=k, cap=CAP, min_experts=min_experts, exact_budget=exact).resolve(K, E)
    for scoring in (SoftmaxScoring(renormalize=True), BiasedScoring(bias=torch.randn(E, generator=gen) * 0.1,
                                                                   renormalize=True, scaling=2.5)):
        logits = logits_for(batch * tokens, gen, levels)
        stats = [RouteStats(histogram=torch.zeros(CAP + 2, dtype=torch.long)) for _ in range(2)]
        runs = iter(stats)
        reference, kernel = both(lambda: route(logits, scoring, cfg, DenseLayout(batch, tokens, valid),
                                               TokenRules.uniform("sequence"), stats=next(runs)))
        assert_same(reference, kernel)
        assert torch.equal(stats[0].histogram, stats[1].histogram)
        assert not kernel.mask[valid.reshape(-1) == False].any()  # noqa: E712


def paged_store(rows: int, context: torch.Tensor, gen, levels: int | None, block: int = 4):
    """A store with `rows` histories in shuffled blocks (room for 64 more tokens each), some -inf entries."""
    width = int(context.max()) + 64
    blocks = -(-width // block)
    table = torch.randperm(rows * blocks, generator=gen).view(rows, blocks).int()
    slots = rows * blocks * block + 1
    scores = torch.softmax(logits_for(slots, gen, levels), dim=-1)
    store = torch.topk(scores, CAP).values
    store[torch.rand(slots, generator=gen) < 0.05] = float("-inf")
    return store, table, block


@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("k,min_experts,exact", [(K, *split) for split in SPLITS] + FRACTIONAL)
def test_packed_step_mixing_every_rule(levels, k, min_experts, exact):
    """One packed step as vLLM runs it: fresh prompts (sequence rule), later chunks (causal, against paged
    history), one-token rows (decode), TopK for generated tokens under decode="topk", padding past the rows."""
    gen = torch.Generator().manual_seed(17 + (levels or 0))
    query = torch.tensor([9, 1, 5, 1, 13, 2, 1])
    context = torch.tensor([0, 30, 11, 0, 7, 57, 3])
    rows, tokens = len(query), int(query.sum()) + 3  # 3 padding tokens
    starts = torch.cat([torch.zeros(1, dtype=torch.long), query.cumsum(0)])
    store, table, block = paged_store(rows, context, gen, levels)
    for decode in ("expert_cache", "topk") if k == int(k) else ("expert_cache",):  # (topk needs a whole k)
        for prefill in ("sequence", "causal"):
            cfg = SeqTopKConfig(k=k, cap=CAP, min_experts=min_experts, exact_budget=exact, prefill=prefill,
                                decode=decode).resolve(K, E)
            batch = ragged_batch(starts, context + query, tokens, int(query.max()))
            position = batch.positions()
            prompt_len = torch.tensor([9, 20, 16, 1, 20, 50, 2])
            prompt = (position < prompt_len[batch.row]) & batch.real
            fresh = prompt & (batch.context[batch.row] == 0)
            rules = TokenRules.per_token(cfg, fresh, batch.real & ~prompt, batch.max_query)
            slots = torch.where(batch.real, table[batch.row, position // block].long() * block + position % block, -1)
            logits = logits_for(tokens, gen, levels)
            stores = [store.clone(), store.clone()]
            stats = [RouteStats(token_class=(prompt.to(torch.int8) + 2 * (batch.real & ~prompt).to(torch.int8)),
                                counters=torch.zeros(5, dtype=torch.long)) for _ in range(2)]
            runs = iter(range(2))

            def run():
                i = next(runs)
                paged = PagedLayout(table, block, batch.context, int(batch.context.max()), store.shape[0],
                                    write_slots=slots)
                return route(logits, SoftmaxScoring(renormalize=False), cfg, batch, rules, paged.of(stores[i]),
                             unchosen="repeat_best", stats=stats[i])

            reference, kernel = both(run)
            assert_same(reference, kernel)
            assert not kernel.mask[~batch.real].any()
            written = slots[slots >= 0]
            assert torch.equal(stores[0][written], stores[1][written])  # the same history write
            assert torch.equal(stats[0].counters, stats[1].counters)


def decode_case(seed: int, levels: int | None):
    gen = torch.Generator().manual_seed(seed)
    rows = 5
    context = torch.tensor([0, 1, 40, 120, 300])
    store, table, block = paged_store(rows, context + 400, gen, levels, block=16)
    return gen, rows, context, store, table, block


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("k,min_experts,exact", [(K, 1, False), (K, 2, True), (1.5, 1, False), (0.6, 0, False)])
def test_decode_steps_from_bands_equal_the_torch_rule(levels, k, min_experts, exact):
    """Rows decode for hundreds of steps; the scores' scale moves in phases, so the streaming cut drifts out of
    each band (rebuilt from the store) and back. Every step equals the torch rule on the same store."""
    gen, rows, context, store, table, block = decode_case(3 + (levels or 0), levels)
    cfg = SeqTopKConfig(k=k, cap=CAP, min_experts=min_experts, exact_budget=exact).resolve(K, E)
    rules = TokenRules.uniform("causal")
    bands = new_bands(rows)
    store_ref = store.clone()
    for step in range(400):
        phase = (step // 100) % 2  # sharp routers, then flat ones, then sharp again ...
        logits = logits_for(rows, gen, levels) * (3.0 if phase == 0 else 0.3)
        if step % 37 == 5:
            logits[2] = logits[1]  # an exact repeat of another row's scores
        batch = ragged_batch(torch.arange(rows + 1), context + 1, rows, 1)
        slots = table[torch.arange(rows), context // block].long() * block + context % block
        layout = PagedLayout(table, block, batch.context, int(batch.context.max()), store.shape[0],
                             write_slots=slots, row_band=torch.arange(rows))
        kernel = route(logits, SoftmaxScoring(renormalize=True), cfg, batch, rules, layout.of(store, bands))
        with backend.forced(backend.TORCH):
            reference = route(logits, SoftmaxScoring(renormalize=True), cfg, batch, rules, layout.of(store_ref))
        assert_same(reference, kernel)
        assert torch.equal(store, store_ref)
        context = context + 1


def test_a_history_rewritten_behind_the_band_is_caught():
    """The torch path writes a row's next position without the band; the band notices (length) and rebuilds.
    Then a crop: the history shrinks and is rewritten to the same length the band had; the band notices (its
    last position's slot and values) and rebuilds."""
    gen, rows, context, store, table, block = decode_case(7, None)
    cfg = SeqTopKConfig(k=K, cap=CAP).resolve(K, E)
    rules = TokenRules.uniform("causal")
    bands = new_bands(rows)

    def step(ctx, logits, use_bands=True):
        batch = ragged_batch(torch.arange(rows + 1), ctx + 1, rows, 1)
        slots = table[torch.arange(rows), ctx // block].long() * block + ctx % block
        layout = PagedLayout(table, block, batch.context, int(batch.context.max()), store.shape[0],
                             write_slots=slots, row_band=torch.arange(rows))
        kernel = route(logits, SoftmaxScoring(renormalize=True), cfg, batch, rules,
                       layout.of(store, bands if use_bands else None))
        with backend.forced(backend.TORCH):
            reference = route(logits, SoftmaxScoring(renormalize=True), cfg, batch, rules, layout.of(store.clone()))
        assert_same(reference, kernel)

    for _ in range(3):
        step(context, logits_for(rows, gen, None))
        context = context + 1
    with backend.forced(backend.TORCH):  # a writer that does not keep the bands
        step(context, logits_for(rows, gen, None))
    context = context + 1
    step(context, logits_for(rows, gen, None))
    context = context + 1
    crop = context - 2  # two positions rolled back, then two new tokens written without the bands
    step(crop, logits_for(rows, gen, None), use_bands=False)
    step(crop + 1, logits_for(rows, gen, None), use_bands=False)
    step(context, logits_for(rows, gen, None))
    mark_stale(bands, torch.tensor([0, 3]))
    step(context + 1, logits_for(rows, gen, None))


def test_bands_must_not_be_shared_by_two_rows():
    gen, rows, context, store, table, block = decode_case(9, None)
    cfg = SeqTopKConfig(k=K, cap=CAP).resolve(K, E)
    batch = ragged_batch(torch.arange(rows + 1), context + 1, rows, 1)
    layout = PagedLayout(table, block, batch.context, int(batch.context.max()), store.shape[0],
                         write_slots=torch.arange(rows), row_band=torch.tensor([0, 1, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="share one routing band"):
        route(logits_for(rows, gen, None), SoftmaxScoring(renormalize=True), cfg, batch,
              TokenRules.uniform("causal"), layout.of(store, new_bands(rows)))


def test_a_tie_at_the_cut_is_not_counted_as_greater():
    """4 earlier tokens beat everything (24 values), 1 earlier token has exactly this token's scores. With 4 real
    earlier tokens and k=5 the budget is 5 * 5 = 25: the best candidate has 24 strictly greater values (its tie
    does not count) and is taken; counting the tie as greater would drop it. Same with and without a band."""
    cap, block = 6, 4
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5]])  # six experts, best first
    scoring = SoftmaxScoring(renormalize=False)
    store = torch.full((9, cap), float("-inf"))
    store[:4] = 1.0
    store[4] = scoring.candidates(logits, cap).values[0]
    # one new token after 5 history positions, 4 of them real (as a left-padded transformers row)
    batch = DenseLayout(1, 1, torch.ones(1, 1, dtype=torch.bool), seen=torch.tensor([4]))
    cfg = SeqTopKConfig(k=5, cap=cap, min_experts=0).resolve(5, cap)
    expected = torch.tensor([[True, False, False, False, False, False]])
    for bands in (None, new_bands(1)):
        layout = PagedLayout(torch.tensor([[0, 1]], dtype=torch.int32), block, torch.tensor([5]), 5, 9,
                             write_slots=torch.tensor([5]), row_band=torch.tensor([0]))
        kernel = route(logits, scoring, cfg, batch, TokenRules.uniform("causal"), layout.of(store.clone(), bands))
        with backend.forced(backend.TORCH):
            reference = route(logits, scoring, cfg, batch, TokenRules.uniform("causal"), layout.of(store.clone()))
        assert torch.equal(reference.mask, expected) and torch.equal(kernel.mask, expected)
