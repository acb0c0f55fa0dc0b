"""The compiled CPU kernels that set-up built are the path that routes on the CPU, not the torch fallback.

Other tests compare the kernels with the torch reference; none of them would notice if every engine quietly
ran the reference instead (same choices, slower). These tests need the kernels (tests/conftest.py's
compiled_kernels: a skip saying to run `seqtopk kernels --build`, a failure under CI=true) and count the op's
calls in a real forward pass with torch's profiler.
"""

import torch
from torch.profiler import ProfilerActivity, profile

import seqtopk
from seqtopk.kernels import backend

ROUTE_OP = "seqtopk_cpu::route_step"


def route_op_calls(model, tokens: torch.Tensor) -> int:
    """How many times one forward pass of `model` calls the compiled routing op."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tokens)
    return sum(event.count for event in prof.key_averages() if event.key == ROUTE_OP)


def test_the_cpu_routes_on_the_compiled_kernels(compiled_kernels):
    cpu = torch.device("cpu")
    assert backend.backend_for(cpu) == backend.CPU_KERNELS
    assert backend.describe(cpu).startswith("cpu-kernels (compiled CPU kernels: ")
    assert "loaded from" in backend.describe(cpu)


def test_a_patched_forward_calls_the_compiled_op_once_per_moe_layer(compiled_kernels, load_tiny):
    model, _ = load_tiny("olmoe")
    seqtopk.patch(model, k=1.5)
    layers = sum(1 for name, _ in model.named_modules() if name.endswith("mlp.experts"))
    tokens = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    assert route_op_calls(model, tokens) == layers > 0
    with backend.forced(backend.TORCH):  # the count does see the path: the reference never calls the op
        assert route_op_calls(model, tokens) == 0
