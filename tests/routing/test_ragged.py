"""Packed (ragged) batches route exactly as each sequence would alone, in one shot or chunk by chunk."""

import pytest
import torch

from seqtopk.config import ResolvedConfig
from seqtopk.routing.paged import gather_paged, history_slots, write_paged
from seqtopk.routing.ragged import from_dense, ragged_batch, select_ragged, to_dense
from seqtopk.routing.rules import TokenRules, select_causal, select_sequence

K, CAP, BLOCK = 2, 4, 4
CAUSAL_ONLY = TokenRules.uniform("causal")


def settings(exact_budget=False):
    return ResolvedConfig(k=K, cap=CAP, min_experts=1, exact_budget=exact_budget, prefill="sequence",
                          decode="expert_cache")


def serving_rules(fresh, generated, batch):
    """The rules a serving step gets for these fresh prompt / generated tokens (prefill="sequence")."""
    return TokenRules.per_token(settings(), fresh, generated, batch.max_query)


def capped(tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(tokens, 8, generator=gen) * 2, dim=-1)
    return torch.topk(probs, CAP, dim=-1).values


def layout(query_lens, context_lens, pad=0):
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()))
    seq_lens = torch.tensor(context_lens) + torch.tensor(query_lens)
    return ragged_batch(starts, seq_lens, int(starts[-1]) + pad, max(query_lens))


def test_layout_hand_checked():
    batch = layout([3, 1, 2], [0, 5, 2], pad=2)
    assert batch.row.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert batch.col.tolist()[:6] == [0, 1, 2, 0, 0, 1]
    assert batch.real.tolist() == [True] * 6 + [False] * 2
    assert batch.positions().tolist()[:6] == [0, 1, 2, 5, 2, 3]
    values = torch.arange(8.0).unsqueeze(-1)
    dense, valid = to_dense(values, batch, fill=-1.0)
    assert dense.squeeze(-1).tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]
    assert valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert from_dense(dense, batch)[:6].squeeze(-1).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("exact_budget", [False, True])
def test_packed_step_equals_each_sequence_alone(exact_budget):
    # Three sequences at different points: a fresh prompt, a decode step, a continued chunk.
    query, context = [5, 1, 3], [0, 7, 4]
    full = [capped(q + c, seed=i) for i, (q, c) in enumerate(zip(query, context))]
    batch = layout(query, context, pad=3)
    values = torch.cat([seq[c:] for seq, c in zip(full, context)] + [torch.zeros(3, CAP)])
    width = max(context)
    history = torch.full((3, width, CAP), float("-inf"))
    for r, (seq, c) in enumerate(zip(full, context)):
        history[r, :c] = seq[:c]
    mask = select_ragged(values, batch, CAUSAL_ONLY, settings(exact_budget), history)
    assert not mask[-3:].any(), "padding tokens take no expert"
    start = 0
    for seq, q, c in zip(full, query, context):
        alone = select_causal(seq.unsqueeze(0), None, K, 1, exact_budget)[0, c:]
        assert torch.equal(mask[start:start + q], alone)
        start += q


def test_sequence_rule_for_prompt_tokens_then_causal():
    # A recomputed sequence: 4 prompt tokens routed by the sequence rule, 2 generated ones causally.
    seq = capped(6, seed=3)
    batch = layout([6], [0])
    prompt = torch.tensor([True] * 4 + [False] * 2)
    mask = select_ragged(seq, batch, serving_rules(prompt, ~prompt, batch), settings())
    assert torch.equal(mask[:4], select_sequence(seq[:4].unsqueeze(0), None, K)[0])
    # The generated tokens follow the streaming rule over everything before them.
    assert torch.equal(mask[4:], select_causal(seq.unsqueeze(0), None, K)[0, 4:])


def test_paged_history_chunk_by_chunk_equals_one_shot():
    # Two sequences sharing one paged store, interleaved in steps of different chunk sizes.
    lengths = [11, 7]
    full = [capped(n, seed=10 + i) for i, n in enumerate(lengths)]
    block_table = torch.tensor([[2, 0, 5], [4, 1, 3]])  # scattered blocks, as a paged cache hands out
    store = torch.zeros(6 * BLOCK + 1, CAP)
    chosen = [[], []]
    done = [0, 0]
    for step in ([4, 3], [1, 1], [5, 2], [1, 1]):
        query = [min(s, n - d) for s, n, d in zip(step, lengths, done)]
        batch = layout(query, done)
        values = torch.cat([seq[d:d + q] for seq, d, q in zip(full, done, query)])
        slots = torch.cat([block_table[r, (d + torch.arange(q)) // BLOCK] * BLOCK + (d + torch.arange(q)) % BLOCK
                           for r, (d, q) in enumerate(zip(done, query))])
        history = gather_paged(store, *history_slots(block_table, BLOCK, batch.context, max(done), len(store)))
        mask = select_ragged(values, batch, CAUSAL_ONLY, settings(), history)
        write_paged(store, slots, values)
        start = 0
        for r, q in enumerate(query):
            chosen[r].append(mask[start:start + q])
            start += q
            done[r] += q
    for r, seq in enumerate(full):
        assert torch.equal(torch.cat(chosen[r]), select_causal(seq.unsqueeze(0), None, K)[0])


def test_padding_slots_never_reach_history():
    store = torch.zeros(2 * BLOCK + 1, CAP)
    write_paged(store, torch.tensor([0, -1, -1]), torch.ones(3, CAP))
    history = gather_paged(store, *history_slots(torch.tensor([[0, 1]]), BLOCK, torch.tensor([2 * BLOCK]),
                                                 2 * BLOCK, len(store)))
    assert history[0, 0].eq(1).all() and history[0, 1:].eq(0).all()


def test_decode_step_has_no_host_reads():
    """The decode path compiles as one graph: no .item(), .tolist(), nonzero or data-dependent shapes,
    which is what CUDA graph capture needs."""

    def decode_step(starts, seq_lens, values, store, block_table, slots):
        batch = ragged_batch(starts, seq_lens, values.shape[0], 1)
        history = gather_paged(store, *history_slots(block_table, BLOCK, batch.context, 12, len(store)))
        mask = select_ragged(values, batch, CAUSAL_ONLY, settings(), history)
        write_paged(store, slots, values)
        return mask

    args = (torch.tensor([0, 1, 2, 3]), torch.tensor([5, 9, 12]), capped(4, seed=1),
            torch.rand(4 * BLOCK + 1, CAP), torch.tensor([[0, 1, 2], [3, 0, 1], [2, 3, 0]]),
            torch.tensor([4, 8, 11, -1]))
    eager = decode_step(*[a.clone() for a in args])
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager", dynamic=False)
    assert torch.equal(compiled(*[a.clone() for a in args]), eager)


def test_mixed_step_routes_decode_rows_apart_from_prefill_rows():
    # Decode rows next to a long fresh prompt give the same choices as each sequence alone.
    query, context = [1, 9, 1, 4], [6, 0, 3, 2]
    full = [capped(q + c, seed=20 + i) for i, (q, c) in enumerate(zip(query, context))]
    batch = layout(query, context, pad=2)
    values = torch.cat([seq[c:] for seq, c in zip(full, context)] + [torch.zeros(2, CAP)])
    history = torch.full((4, max(context), CAP), float("-inf"))
    for r, (seq, c) in enumerate(zip(full, context)):
        history[r, :c] = seq[:c]
    fresh = torch.zeros(values.shape[0], dtype=torch.bool)
    fresh[1:10] = True  # the prompt of row 1 starts here: the sequence rule
    mask = select_ragged(values, batch, serving_rules(fresh, torch.zeros_like(fresh), batch), settings(), history)
    starts = [0, 1, 10, 11]
    for r, (seq, q, c) in enumerate(zip(full, query, context)):
        rule = select_sequence if r == 1 else (lambda v, *a: select_causal(v, *a)[:, c:])
        assert torch.equal(mask[starts[r]:starts[r] + q], rule(seq.unsqueeze(0), None, K)[0])
    assert not mask[-2:].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
def test_decode_step_captures_and_replays_in_a_cuda_graph():
    """Capture fails on any host sync; replay with new step data in the same buffers must match eager."""
    device = "cuda"

    def step_data(seed):
        gen = torch.Generator().manual_seed(seed)
        seq_lens = torch.randint(2, 13, (3,), generator=gen)
        return dict(starts=torch.tensor([0, 1, 2, 3]), seq_lens=seq_lens, values=capped(4, seed=seed),
                    store=torch.rand(4 * BLOCK + 1, CAP, generator=gen),
                    block_table=torch.stack([torch.randperm(4, generator=gen)[:3] for _ in range(3)]),
                    slots=torch.tensor([1, 6, 13, -1]))

    def decode_step(d):
        batch = ragged_batch(d["starts"], d["seq_lens"], d["values"].shape[0], 1)
        history = gather_paged(d["store"], *history_slots(d["block_table"], BLOCK, batch.context, 12,
                                                          d["store"].shape[0]))
        mask = select_ragged(d["values"], batch, CAUSAL_ONLY, settings(), history)
        write_paged(d["store"], d["slots"], d["values"])
        return mask

    buffers = {k: v.to(device) for k, v in step_data(0).items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_step({k: v.clone() for k, v in buffers.items()})  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_step(buffers)
    for seed in (1, 2, 3):
        fresh = step_data(seed)
        for name, value in fresh.items():
            buffers[name].copy_(value)
        graph.replay()
        expected_store = fresh["store"].clone()
        expected = decode_step({**fresh, "store": expected_store})
        assert torch.equal(captured.cpu(), expected)
        assert torch.equal(buffers["store"].cpu(), expected_store)
