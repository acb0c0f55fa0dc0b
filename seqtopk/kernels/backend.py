"""Which implementation routes tensors on a device: the one place that decides, for every engine.

- "cpu-kernels": the compiled C++ ops (seqtopk/kernels/cpu, built by `seqtopk kernels --build`) for tensors on
  the CPU: every rule, the history write, the decode bands, the row plan and the combine;
- "triton": the fused Triton kernels for tensors on a CUDA GPU (the sequence cut and the one-token decode step;
  what they do not cover runs on the torch reference);
- "torch": the pure-torch reference (seqtopk.routing.rules and seqtopk.routing.dispatch), everywhere else.

All three make the same routing decisions (tests compare them slot for slot). `forced(path)` runs a block on
another path where it can run (benchmarks and tests compare the paths side by side).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from seqtopk.kernels import compiled
from seqtopk.kernels import decode_step

CPU_KERNELS, TRITON, TORCH = "cpu-kernels", "triton", "torch"
PATHS = (CPU_KERNELS, TRITON, TORCH)
_forced: list[str] = []
_default: dict = {}  # device -> path when nothing is forced (asked several times per layer, so remembered)


def backend_for(device: torch.device) -> str:
    """The implementation that routes tensors on `device`."""
    if not _forced:
        path = _default.get(device)
        if path is not None:
            return path
    device = torch.device(device)
    if _forced:
        wanted = _forced[-1]
        if wanted == CPU_KERNELS and device.type == "cpu" and compiled.load():
            return CPU_KERNELS
        if wanted == TRITON and decode_step.runs_on(device):  # (on CPU under Triton's interpreter, for checks)
            return TRITON
        return TORCH
    if device.type == "cpu" and compiled.load():
        path = CPU_KERNELS
    else:
        path = TRITON if decode_step.available(device) else TORCH
    if path != TORCH:  # (a torch answer may change once kernels are built: asked again)
        _default[device] = path
    return path


class TritonSteps:
    """The Triton kernels' share of the rules, handed to the torch rules when `backend_for` answers TRITON (by
    seqtopk.routing.router.route, the one routing call): each step returns the mask, or None where its
    kernel does not serve the tensors (the torch reference then runs)."""

    @staticmethod
    def sequence_cut(values: torch.Tensor, valid: torch.Tensor | None, split) -> torch.Tensor | None:
        """The sequence rule's cut, [B, T, C] -> mask: a radix select, no host sync. Whole budgets only."""
        from seqtopk.kernels import sequence_cut

        if split.scale != 1 or not decode_step.runs_on(values.device) or values.dtype not in sequence_cut.DTYPES:
            return None
        return sequence_cut.select_sequence_dense(values, valid, split)

    @staticmethod
    def causal_step(values: torch.Tensor, valid: torch.Tensor, history, seen: torch.Tensor, split) -> torch.Tensor | None:
        """One new token per row under the causal rule, [B, 1, C] -> mask, straight from the paged store."""
        if split.scale != 1 or values.dtype != torch.float32 or not decode_step.runs_on(values.device):
            return None
        batch, _, cap = values.shape
        paged = history.layout
        mask = decode_step.paged_decode(values.view(batch, cap), history.store, paged.block_table, paged.block_size,
                                        paged.length, seen, valid.view(batch), split, cap=cap, from_probs=False)
        return mask.view(batch, 1, cap)


TRITON_STEPS = TritonSteps()


@contextmanager
def forced(path: str):
    """Route on `path` inside this block where the device offers it, else on the torch reference
    (forced(TORCH) switches every kernel off)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    _forced.append(path)
    try:
        yield
    finally:
        _forced.pop()


def describe(device: torch.device) -> str:
    """What routes tensors on `device`, and why, in words (start-up lines, `seqtopk doctor`): e.g.
    "cpu-kernels (compiled CPU kernels: loaded from ...)", "torch (... run `seqtopk kernels --build`)"."""
    device = torch.device(device)
    triton = decode_step.triton
    no_triton = "triton is not installed (it comes with torch's CUDA wheels)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "none (no CUDA device here; on one: " + (f"triton {triton.__version__})" if triton is not None
                                                          else f"torch, {no_triton})")
    path = backend_for(device)
    why = ""
    if _forced:  # (inside a forced() block: the asked path, then what is available here)
        wanted = _forced[-1]
        why = f"forced({wanted!r})" + ("" if wanted == path else ", which cannot run here") + "; "
    if device.type == "cpu" and path == TRITON:
        why += f"triton {triton.__version__} in its interpreter (TRITON_INTERPRET=1): for checks, never chosen"
    elif device.type == "cpu":
        why += compiled.status()
    elif device.type == "cuda":
        why += f"triton {triton.__version__} on {torch.cuda.get_device_name(device)}" if triton is not None else no_triton
    else:
        why += f"no kernels for {device.type} tensors"
    return f"{path} ({why})"
