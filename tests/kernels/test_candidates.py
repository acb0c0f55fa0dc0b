"""The compiled top-cap (seqtopk/kernels/cpu/candidates.cpp) against its torch reference
(seqtopk.routing.rules.capped_candidates): the same experts in the same order, ties included.

Scores drawn from a few levels tie exactly, as bf16 router logits do; caps run past 16, where the compiled op
leaves its 16-lane path for the scalar one; -0.0, NaN and infinities are ranked as the reference ranks them.
"""

import pytest
import torch

from seqtopk.kernels import backend, compiled, ops
from seqtopk.kernels.paths import compiled_candidates
from seqtopk.routing.rules import capped_candidates


@pytest.fixture(scope="module", autouse=True)
def kernel(compiled_kernels):
    assert backend.backend_for(torch.device("cpu")) == backend.CPU_KERNELS, compiled.status()


def same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[1], b[1]) and torch.equal(a[0].view(torch.int32), b[0].view(torch.int32))


@pytest.mark.parametrize("experts", [1, 7, 16, 17, 64, 130])
def test_compiled_order_equals_the_reference(experts):
    gen = torch.Generator().manual_seed(experts)
    for cap in sorted({c for c in (1, 2, 10, 16, 17, experts) if c <= experts}):
        for levels in (3, 50, None):
            scores = (torch.randn(200, experts, generator=gen) if levels is None
                      else torch.randint(0, levels, (200, experts), generator=gen).float())
            scores = torch.softmax(scores, -1) if levels is None else scores
            assert same(ops.capped_candidates(scores, cap), capped_candidates(scores, cap)), (cap, levels)


def test_signed_zeros_nan_and_infinities_rank_as_in_the_reference():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(-2, 3, (64, 40), generator=gen).float()
    scores[scores == 0] = -0.0
    scores[::3, 5] = 0.0
    scores[::4, 7] = float("nan")
    scores[1::5, 9] = float("inf")
    scores[2::5, 11] = float("-inf")
    for cap in (1, 5, 16, 20, 40):
        assert same(ops.capped_candidates(scores, cap), capped_candidates(scores, cap)), cap


def test_paths_choose_the_compiled_op_only_where_it_serves():
    scores = torch.rand(6, 9, requires_grad=True)
    values, ids = compiled_candidates(scores, 3)  # (a gradient to carry: the torch reference)
    values.sum().backward()
    assert scores.grad.count_nonzero() == 18
    assert same(compiled_candidates(scores.detach(), 3), ops.capped_candidates(scores.detach(), 3))
    half = scores.detach().bfloat16()
    assert torch.equal(compiled_candidates(half, 3)[1], capped_candidates(half, 3)[1])


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="cap must be in"):
        ops.capped_candidates(torch.rand(3, 4), 5)
    with pytest.raises(RuntimeError, match="float32"):
        ops.capped_candidates(torch.rand(3, 4).double(), 2)
