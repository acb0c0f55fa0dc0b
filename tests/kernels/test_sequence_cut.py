"""The fused sequence-rule kernel (Triton) against its torch reference, seqtopk.routing.rules.select_sequence.

On a CUDA GPU the kernel runs natively (also with host syncs turned into errors, and inside a captured CUDA
graph). Everywhere else (CI) the same checks run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1), in one child process because Triton reads that variable when the kernel module is
imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqtopk.kernels import sequence_cut as fused

REPO = Path(__file__).resolve().parents[2]
BUDGETS = [(False, 1), (True, 1), (True, 2), (False, 0)]  # exact_budget, min_experts
CAP = 10
KS = [1, 4, CAP]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_triton = pytest.mark.skipif(fused.triton is None, reason="triton is not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused.triton is not None),
                                reason="needs a CUDA GPU with Triton")



def fused_sequence_cut(values, starts, routed, k, min_experts, exact_budget, **kwargs):
    from seqtopk.routing.rules import budget_split

    split = budget_split(k, values.shape[-1], min_experts, exact_budget)
    return fused.sequence_cut(values, starts, routed, split, **kwargs)


def fused_select_dense(values, valid, k, min_experts=1, exact_budget=False):
    from seqtopk.routing.rules import budget_split

    return fused.select_sequence_dense(values, valid, budget_split(k, values.shape[-1], min_experts, exact_budget))

def _scores(tokens: int, cap: int, generator: torch.Generator, levels: int = 0, signed: bool = False):
    """[tokens, cap] scores sorted best first; `levels` > 0 quantizes them (many exact ties)."""
    raw = torch.randn(tokens, cap, generator=generator) if signed else torch.rand(tokens, cap, generator=generator)
    if levels:
        raw = torch.round(raw * levels) / levels
    return raw.sort(dim=-1, descending=True).values


def packed_case(cap: int = CAP):
    """Packed rows of different lengths: (values [N, cap] float32, starts [R+1], routed [N]).

    Row 0: plain scores, padding in the middle and at the end. Row 1: empty. Row 2: 20 distinct tokens
    repeated 10 times (exact ties straddle every cut). Row 3: one token. Row 4: coarse signed scores with
    zeros of both signs. Row 5: nothing routed. Then 9 tokens that belong to no row. Padding entries hold
    garbage (nan, +-inf, huge values) that must be ignored.
    """
    g = torch.Generator().manual_seed(0)
    rows = [
        _scores(150, cap, g),
        _scores(0, cap, g),
        _scores(20, cap, g, levels=8).repeat(10, 1),
        _scores(1, cap, g),
        _scores(97, cap, g, levels=3, signed=True),
        _scores(12, cap, g),
    ]
    rows[4][rows[4] == 0] = -0.0
    rows[4][::3, -1] = 0.0
    tail = _scores(9, cap, g)
    values = torch.cat(rows + [tail])
    lengths = torch.tensor([len(r) for r in rows])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    routed = torch.ones(len(values), dtype=torch.bool)
    s = starts.tolist()
    routed[s[0] + 40:s[0] + 47] = False  # padding in the middle of row 0
    routed[s[1] - 5:s[1]] = False  # and at its end
    routed[s[2] + 7] = False  # one padding token among the repeated ones
    routed[s[2] + 150:s[3]] = False
    routed[s[4] + 30:s[4] + 33] = False
    routed[s[5]:s[6]] = False  # a row with nothing routed
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38, -3e38])
    pad = ~routed
    values[pad] = garbage[torch.arange(int(pad.sum())) % len(garbage)].unsqueeze(1).expand(-1, cap)
    values[s[2] + 7, 0] = float("nan")
    values[-9:] = float("nan")  # tokens past starts[R] (routed, but in no row)
    return values, starts, routed


def reference_packed(values, starts, routed, k, min_experts, exact_budget):
    """rules.select_sequence row by row; tokens outside every row take nothing."""
    from seqtopk.routing.rules import select_sequence

    out = torch.zeros(values.shape, dtype=torch.bool)
    s = starts.tolist()
    for begin, end in zip(s[:-1], s[1:]):
        out[begin:end] = select_sequence(values[begin:end].unsqueeze(0), routed[begin:end].unsqueeze(0), k,
                                         min_experts, exact_budget).squeeze(0)
    return out


def ties_straddle_the_cut(values, routed, per_token) -> bool:
    """Whether exact ties straddle the cut of this row (the case the tie rule decides)."""
    real = values[routed].float().flatten()
    budget = int(routed.sum()) * per_token
    if budget <= 0 or budget >= real.numel():
        return False
    cut = real.sort(descending=True).values[budget - 1]
    return bool((real > cut).sum() < budget < (real >= cut).sum())


def check_packed(device: str, sync_free: bool = False) -> None:
    values, starts, routed = packed_case()
    s = starts.tolist()
    assert ties_straddle_the_cut(values[s[2]:s[3]], routed[s[2]:s[3]], 4)
    # float32: every budget split and k; bf16 / fp16: every budget split at one k.
    cases = [(torch.float32, e, m, k) for e, m in BUDGETS for k in KS]
    cases += [(dtype, e, m, 4) for dtype in DTYPES[1:] for e, m in BUDGETS]
    for dtype, exact_budget, min_experts, k in cases:
        typed = values.to(dtype)
        expected = reference_packed(typed, starts, routed, k, min_experts, exact_budget)
        args = (typed.to(device), starts.to(device), routed.to(device), k, min_experts, exact_budget)
        if sync_free:
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = fused_sequence_cut(*args)
        finally:
            if sync_free:
                torch.cuda.set_sync_debug_mode("default")
        assert got.dtype == torch.bool and got.shape == values.shape
        assert torch.equal(got.cpu(), expected), (dtype, exact_budget, min_experts, k)
    # Small blocks: the cut and its ties spread over several blocks; int32 starts.
    for exact_budget, min_experts in BUDGETS[1:3]:
        expected = reference_packed(values, starts, routed, 3, min_experts, exact_budget)
        got = fused_sequence_cut(values.to(device), starts.int().to(device), routed.to(device), 3, min_experts,
                                 exact_budget, block=256)
        assert torch.equal(got.cpu(), expected), (exact_budget, min_experts)
    # A narrow cap, and a cap where nothing competes under the exact budget (one column, one forced).
    for cap, k in ((3, 2), (1, 1)):
        values, starts, routed = packed_case(cap)
        for exact_budget, min_experts in BUDGETS:
            expected = reference_packed(values, starts, routed, k, min_experts, exact_budget)
            got = fused_sequence_cut(values.to(device), starts.to(device), routed.to(device), k, min_experts,
                                     exact_budget)
            assert torch.equal(got.cpu(), expected), (cap, k, exact_budget, min_experts)


def check_dense(device: str) -> None:
    from seqtopk.routing.rules import select_sequence

    g = torch.Generator().manual_seed(1)
    batch, length = 3, 50
    values = _scores(batch * length, CAP, g, levels=6).view(batch, length, CAP)
    valid = torch.rand(batch, length, generator=g) > 0.2
    valid[1] = False  # a row of padding only
    valid[2, 40:] = False
    values[~valid] = float("-inf")
    cases = [(e, m, k, valid) for e, m in BUDGETS for k in (1, 3)] + [(False, 1, CAP, valid), (True, 1, 3, None)]
    for exact_budget, min_experts, k, mask in cases:
        expected = select_sequence(values, mask, k, min_experts, exact_budget)
        got = fused_select_dense(values.to(device), None if mask is None else mask.to(device), k,
                                          min_experts, exact_budget)
        assert got.shape == (batch, length, CAP)
        assert torch.equal(got.cpu(), expected), (exact_budget, min_experts, k, mask is None)


def check_cuda_graph() -> None:
    """Captured once, replayed on new inputs of the same shapes: the same choices as the torch rule."""
    values, starts, routed = packed_case()
    static = [values.cuda(), starts.cuda(), routed.cuda()]
    fused_sequence_cut(*static, 4, 1, True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_sequence_cut(*static, 4, 1, True)
    g = torch.Generator().manual_seed(5)
    fresh = _scores(len(values), CAP, g, levels=5)
    flipped = routed.clone()
    flipped[::11] = False
    static[0].copy_(fresh)
    static[2].copy_(flipped)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), reference_packed(fresh, starts, flipped, 4, 1, True))


@needs_cuda
def test_sequence_cut_equals_torch_rule_on_cuda():
    check_packed("cuda", sync_free=True)
    check_dense("cuda")
    check_cuda_graph()


@needs_triton
def test_sequence_cut_equals_torch_rule_in_the_triton_interpreter():
    code = ("from tests.kernels.test_sequence_cut import check_packed, check_dense; "
            "check_packed('cpu'); check_dense('cpu')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


def test_available_only_on_cuda():
    assert not fused.available(torch.device("cpu"))
