"""The vLLM-shaped decode routing step, as a CUDA graph holds it: captured once per batch size, replayed with
other layouts (rows finishing, new rows, other contexts, padded tails).

The step is built the way the vLLM adapter builds it under capture (seqtopk.engines.vllm.step.step_from_buffers
on persistent buffers: one row per token of the padded batch, the block table's full width) and routed with
seqtopk.routing.router.route. Its choices and history writes must equal the eager step's (live rows only, the
longest context as width) on every layout. On CUDA the step is captured and replayed; on CPU the same function
must compile as one graph (torch.compile fullgraph) and not recompile when only the metadata changes.
"""

import pytest
import torch

from seqtopk.testing.require import needs

from seqtopk.config import SeqTopKConfig
from seqtopk.engines.vllm.step import step_from_buffers
from seqtopk.kernels import backend
from seqtopk.kernels import decode_step as fused_gpu
from seqtopk.kernels.paths import route
from seqtopk.routing.scoring import BiasedScoring, SoftmaxScoring

TOKENS, EXPERTS, BLOCK, MAX_BLOCKS, CAP = 8, 32, 4, 6, 6
SLOTS = 64 * BLOCK + 1  # the store's last row is scratch


def layout(seed: int, live: int, device: str) -> dict:
    """A decode step's buffers for `live` requests in a batch padded to TOKENS: as vLLM fills them."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, MAX_BLOCKS * BLOCK - 1, (live,), generator=gen)
    context[0] = 0  # a request whose first token is this one (a one-token prompt)
    table = torch.zeros(TOKENS, MAX_BLOCKS, dtype=torch.int32)
    table[:live] = torch.randperm(64, generator=gen)[: live * MAX_BLOCKS].view(live, MAX_BLOCKS).int()
    starts = torch.full((TOKENS + 1,), live, dtype=torch.int32)
    starts[: live + 1] = torch.arange(live + 1)
    seq_lens = torch.zeros(TOKENS, dtype=torch.int32)
    seq_lens[:live] = context.int() + 1
    slots = torch.full((TOKENS,), -1, dtype=torch.long)
    position = context
    slots[:live] = table[torch.arange(live), position // BLOCK].long() * BLOCK + position % BLOCK
    prompt = torch.zeros(TOKENS, dtype=torch.long)
    prompt[:live] = torch.randint(1, 12, (live,), generator=gen)  # some rows still in their prompt
    buffers = dict(starts=starts, seq_lens=seq_lens, table=table, slots=slots, prompt=prompt,
                   logits=torch.randn(TOKENS, EXPERTS, generator=gen) * 2,
                   store=torch.rand(SLOTS, EXPERTS, generator=gen).softmax(-1).topk(CAP).values)
    return {name: value.to(device) for name, value in buffers.items()}


LAYOUTS = [(1, 8), (2, 5), (3, 8), (4, 1), (5, 3)]  # (seed, live rows): full, rows finished, new rows, ...


def settings(decode: str, scoring) -> tuple:
    cfg = SeqTopKConfig(k=4, cap=CAP, prefill="sequence", decode=decode).resolve(4, EXPERTS)
    return cfg, scoring


def decode_routing_step(b: dict, cfg, scoring, rows: int, width: int):
    """One MoE layer's routing of a decode step; writes the step's scores into b["store"]."""
    step = step_from_buffers(b["starts"][: rows + 1], b["seq_lens"][:rows], b["table"][:rows], BLOCK, b["slots"],
                             b["prompt"][:rows], TOKENS, SLOTS, max_query=1, width=width)
    routed = route(b["logits"], scoring, cfg, step.batch, step.rules(cfg), step.history(b["store"]),
                   unchosen="repeat_best")
    return routed.mask, routed.weights, routed.ids


def eager_reference(b: dict, cfg, scoring, live: int):
    """The eager vLLM step: live rows only, width = longest context (what `_read_step` builds)."""
    width = int((b["seq_lens"][:live] - 1).max())
    return decode_routing_step(b, cfg, scoring, live, width)


SCORINGS = {
    "softmax": SoftmaxScoring(renormalize=True),  # the fused softmax step
    "sigmoid_groups": BiasedScoring(bias=torch.linspace(-0.05, 0.05, EXPERTS), n_group=4, topk_group=2,
                                          renormalize=True, scaling=2.0),  # values path: scoring in torch
}


def check_replays(run, device: str, decode: str, scoring) -> None:
    """`run(buffers)` routes the buffers in place with the graph-shaped step; compare with eager on each layout."""
    cfg, scoring = settings(decode, scoring)
    for seed, live in LAYOUTS:
        b = layout(seed, live, device)
        expected_store = b["store"].clone()
        expected = eager_reference({**b, "store": expected_store}, cfg, scoring, live)
        mask, weights, ids = run(b)
        assert torch.equal(mask[:live], expected[0][:live]), (seed, live)
        assert not mask[live:].any() and not weights[live:].any()  # padded tokens take nothing
        torch.testing.assert_close(weights, expected[1])
        assert torch.equal(ids[mask], expected[2][mask])
        assert torch.equal(b["store"][:-1], expected_store[:-1])  # the live tokens' slots only (last row: scratch)


@pytest.mark.parametrize("decode", ["expert_cache", "topk"])
@pytest.mark.parametrize("family", list(SCORINGS))
def test_decode_step_compiles_as_one_graph_and_matches_eager(decode, family):
    """CPU: one graph (no break, no host read) that does not recompile when only the metadata changes."""
    import torch._dynamo

    cfg, scoring = settings(decode, SCORINGS[family])
    width = MAX_BLOCKS * BLOCK
    torch._dynamo.reset()
    step = torch.compile(lambda b: decode_routing_step(b, cfg, scoring, TOKENS, width), fullgraph=True,
                         dynamic=True, backend="eager")
    with backend.forced(backend.TORCH):  # the C++ kernel is an opaque op in vLLM; here the torch rule is traced
        step(layout(0, TOKENS, "cpu"))
        with torch._dynamo.config.patch(error_on_recompile=True):
            check_replays(step, "cpu", decode, SCORINGS[family])


@pytest.mark.skipif(not (torch.cuda.is_available() and fused_gpu.triton is not None),
                    reason="needs a CUDA GPU with Triton (CUDA graph capture of the fused decode step)")
@pytest.mark.parametrize("decode", ["expert_cache", "topk"])
@pytest.mark.parametrize("family", list(SCORINGS))
def test_decode_step_captures_once_and_replays_every_layout(decode, family):
    scoring = SCORINGS[family]
    scoring = type(scoring)(**{**scoring.__dict__, **({"bias": scoring.bias.cuda()} if family != "softmax" else {})})
    cfg, _ = settings(decode, scoring)
    width = MAX_BLOCKS * BLOCK
    buffers = layout(0, TOKENS, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles) outside the graph
        decode_routing_step({**buffers, "store": buffers["store"].clone()}, cfg, scoring, TOKENS, width)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_routing_step(buffers, cfg, scoring, TOKENS, width)

    def replay(b):
        for name, value in b.items():
            buffers[name].copy_(value)
        graph.replay()
        b["store"].copy_(buffers["store"])
        return captured

    check_replays(replay, "cuda", decode, scoring)


def check_fused_path(decode: str, family: str) -> None:
    """The graph-shaped step through the Triton kernels (forced on for CPU tensors; run under TRITON_INTERPRET=1)
    against the eager step through the torch rule."""
    from unittest import mock

    cfg, scoring = settings(decode, SCORINGS[family])
    width = MAX_BLOCKS * BLOCK

    def fused(b):
        with mock.patch.object(fused_gpu, "available", lambda device: True), backend.forced(backend.TRITON):
            return decode_routing_step(b, cfg, scoring, TOKENS, width)

    with backend.forced(backend.TORCH):
        check_replays(fused, "cpu", decode, scoring)


@needs("extra", "triton is not installed (pip install triton)" if fused_gpu.triton is None else None)
def test_graph_shaped_step_through_the_triton_kernels_in_the_interpreter():
    import os
    import subprocess
    import sys
    from pathlib import Path

    calls = "; ".join(f"check_fused_path({d!r}, {f!r})" for d in ("expert_cache", "topk") for f in SCORINGS)
    result = subprocess.run([sys.executable, "-c", f"from tests.routing.test_graph_step import check_fused_path; {calls}"],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
