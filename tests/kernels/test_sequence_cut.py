"""The fused sequence-rule kernel (Triton) against its torch reference, seqtopk.routing.rules.select_sequence.

On a CUDA GPU the kernel runs natively (also with host syncs turned into errors, and inside a captured CUDA
graph). Everywhere else (CI) the same checks run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1), in one child process because Triton reads that variable when the kernel module is
imported.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqtopk.testing.require import needs

from seqtopk.kernels import sequence_cut as fused

REPO = Path(__file__).resolve().parents[2]
BUDGETS = [(False, 1), (True, 1), (True, 2), (False, 0)]  # exact_budget, min_experts
CAP = 10
KS = [1, 4, CAP]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_triton = needs("extra", "triton is not installed (pip install triton)" if fused.triton is None else None)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused.triton is not None),
                                reason="needs a CUDA GPU with Triton")



def fused_sequence_cut(values, starts, routed, k, min_experts, exact_budget, **kwargs):
    from seqtopk.budget import budget_split

    split = budget_split(k, values.shape[-1], min_experts, exact_budget)
    return fused.sequence_cut(values, starts, routed, split, **kwargs)


def fused_select_dense(values, valid, k, min_experts=1, exact_budget=False, **kwargs):
    from seqtopk.budget import budget_split

    split = budget_split(k, values.shape[-1], min_experts, exact_budget)
    return fused.select_sequence_dense(values, valid, split, **kwargs)


@contextlib.contextmanager
def syncs_fail(enabled: bool):
    """Host syncs raise inside (CUDA only)."""
    if enabled:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if enabled:
            torch.cuda.set_sync_debug_mode("default")


def run_fused(fn, device: str, sync_free: bool, tensors, *args, **kwargs) -> torch.Tensor:
    """fn on `tensors` moved to the device (host syncs raising when sync_free), the result back on CPU."""
    moved = [None if t is None else t.to(device) for t in tensors]
    with syncs_fail(sync_free):
        got = fn(*moved, *args, **kwargs)
    return got.cpu()


class split_launches:
    """Records the programs per row (P) of each split-path call of sequence_cut, to prove the path ran."""

    def __enter__(self):
        self.parts, self.inner = [], fused._split_cut
        fused._split_cut = lambda args, out, rows, parts, *rest: (self.parts.append(parts),
                                                                  self.inner(args, out, rows, parts, *rest))
        return self.parts

    def __exit__(self, *exc):
        fused._split_cut = self.inner


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


def split_case(cap: int = CAP):
    """Packed rows for the split path, kept small for the interpreter: (values, starts, routed) float32.

    Row 0: 30 coarse tokens repeated twice (exact ties at every cut, spread over several chunks), one padding
    token among them. Row 1: empty. Row 2: coarse signed scores with zeros of both signs, padding at its
    end. Row 3: nothing routed. Then 3 tokens in no row. Padding holds garbage.
    """
    g = torch.Generator().manual_seed(2)
    rows = [_scores(30, cap, g, levels=8).repeat(2, 1), _scores(0, cap, g), _scores(24, cap, g, levels=3, signed=True),
            _scores(3, cap, g)]
    rows[2][rows[2] == 0] = -0.0
    rows[2][::3, -1] = 0.0
    values = torch.cat(rows + [_scores(3, cap, g)])
    starts = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    routed = torch.ones(len(values), dtype=torch.bool)
    s = starts.tolist()
    routed[s[0] + 11] = False
    routed[s[3] - 4:s[3]] = False
    routed[s[3]:s[4]] = False
    pad = ~routed
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38])
    values[pad] = garbage[torch.arange(int(pad.sum())) % len(garbage)].unsqueeze(1).expand(-1, cap)
    values[-3:] = float("nan")
    return values, starts, routed


def ties_cross_chunks(values, routed, split, chunk: int) -> bool:
    """Whether exact ties straddle the cut of this row and lie in more than one chunk of `chunk` entries."""
    forced, first, per_token = split[:3]
    competing = torch.zeros(values.shape, dtype=torch.bool)
    competing[:, first:] = routed.unsqueeze(1)
    real = values.float()[competing]
    budget = int(routed.sum()) * per_token
    if budget <= 0 or budget >= real.numel():
        return False
    cut = real.sort(descending=True).values[budget - 1]
    at = (competing & (values.float() == cut)).flatten().nonzero().flatten()
    return bool((real > cut).sum() < budget < (real >= cut).sum()) and len(set((at // chunk).tolist())) > 1


def check_split(device: str, sync_free: bool = False) -> None:
    """The split path (a row over several programs), forced on small rows with small chunks."""
    from seqtopk.budget import budget_split

    values, starts, routed = split_case()
    chunk = 128  # not a multiple of CAP: chunks cut through tokens
    assert ties_cross_chunks(values[:60], routed[:60], budget_split(3, CAP, 1, False), chunk)
    assert ties_cross_chunks(values[:60], routed[:60], budget_split(3, CAP, 2, True), chunk)
    with split_launches() as parts:
        for dtype in (torch.float32, torch.bfloat16):
            for exact_budget, min_experts in BUDGETS:
                typed = values.to(dtype)
                expected = reference_packed(typed, starts, routed, 3, min_experts, exact_budget)
                got = run_fused(fused_sequence_cut, device, sync_free, (typed, starts, routed), 3, min_experts,
                                exact_budget, max_row_tokens=60, chunk=chunk, split_above=0)
                assert torch.equal(got, expected), (dtype, exact_budget, min_experts)
        # Several blocks per chunk, int32 starts; a bound below the longest row (its last program takes the
        # rest); a large k (every competing entry taken); a cap where nothing competes.
        for k, kwargs in ((4, dict(max_row_tokens=60, block=64)), (3, dict(max_row_tokens=20)), (CAP, {})):
            expected = reference_packed(values, starts, routed, k, 1, True)
            got = run_fused(fused_sequence_cut, device, sync_free, (values, starts.int(), routed), k, 1, True,
                            chunk=chunk, split_above=0, **{"max_row_tokens": 60, **kwargs})
            assert torch.equal(got, expected), (k, kwargs)
        narrow, starts1, routed1 = split_case(1)
        expected = reference_packed(narrow, starts1, routed1, 1, 1, True)
        got = run_fused(fused_sequence_cut, device, sync_free, (narrow, starts1, routed1), 1, 1, True,
                        max_row_tokens=60, chunk=16, split_above=0)
        assert torch.equal(got, expected)
    assert parts == [5] * 8 + [5, 2, 5, 4], parts
    # Without a bound, or under the threshold: one program per row.
    with split_launches() as parts:
        fused_sequence_cut(values.to(device), starts.to(device), routed.to(device), 3, 1, False)
        fused_sequence_cut(values.to(device), starts.to(device), routed.to(device), 3, 1, False,
                           max_row_tokens=60, chunk=chunk, split_above=600)
    assert parts == []


def check_dense_split(device: str, sync_free: bool = False) -> None:
    """select_sequence_dense takes the split path from its shapes (every row holds T tokens)."""
    from seqtopk.routing.rules import select_sequence

    g = torch.Generator().manual_seed(3)
    batch, length = 2, 40
    values = _scores(batch * length, CAP, g, levels=6).view(batch, length, CAP).to(torch.bfloat16)
    valid = torch.rand(batch, length, generator=g) > 0.2
    valid[1, 25:] = False
    values[~valid] = float("-inf")
    with split_launches() as parts:
        for exact_budget, min_experts in BUDGETS:
            expected = select_sequence(values, valid, 2, min_experts, exact_budget)
            got = run_fused(fused_select_dense, device, sync_free, (values, valid), 2, min_experts, exact_budget,
                            chunk=128, split_above=256)
            assert torch.equal(got, expected), (exact_budget, min_experts)
    assert parts == [4] * 4, parts


def check_long_row(device: str, sync_free: bool = False) -> None:
    """The GPU target: one sequence of 16384 tokens x cap 10 (bf16, coarse: ties at the cut), default sizes."""
    from seqtopk.routing.rules import select_sequence

    g = torch.Generator().manual_seed(4)
    values = _scores(16384, CAP, g, levels=64).to(torch.bfloat16).unsqueeze(0)
    with split_launches() as parts:
        for exact_budget, min_experts in BUDGETS:
            expected = select_sequence(values, None, 8, min_experts, exact_budget)
            got = run_fused(fused_select_dense, device, sync_free, (values, None), 8, min_experts, exact_budget)
            assert torch.equal(got, expected), (exact_budget, min_experts)
    assert parts == [16384 * CAP // fused.CHUNK] * 4, parts


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
        got = run_fused(fused_sequence_cut, device, sync_free, (typed, starts, routed), k, min_experts, exact_budget)
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


def check_cuda_graph(**kwargs) -> None:
    """Captured once, replayed on new inputs of the same shapes: the same choices as the torch rule."""
    values, starts, routed = packed_case()
    static = [values.cuda(), starts.cuda(), routed.cuda()]
    fused_sequence_cut(*static, 4, 1, True, **kwargs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_sequence_cut(*static, 4, 1, True, **kwargs)
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
    check_split("cuda", sync_free=True)  # the split path reads nothing back either
    check_dense_split("cuda", sync_free=True)
    check_long_row("cuda", sync_free=True)
    check_cuda_graph(max_row_tokens=200, chunk=256, split_above=0)


def run_interpreted(*checks: str) -> None:
    """Run checks of this module on CPU tensors under Triton's interpreter (a child process: Triton reads
    TRITON_INTERPRET when the kernel module is imported)."""
    code = f"from tests.kernels.test_sequence_cut import {', '.join(checks)}; " + "; ".join(f"{c}('cpu')" for c in checks)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


@needs_triton
def test_sequence_cut_equals_torch_rule_in_the_triton_interpreter():
    run_interpreted("check_packed", "check_dense")


@needs_triton
def test_split_path_equals_torch_rule_in_the_triton_interpreter():
    run_interpreted("check_split", "check_dense_split")


def test_available_only_on_cuda():
    assert not fused.available(torch.device("cpu"))
