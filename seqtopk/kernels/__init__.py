"""Fused routing kernels, each with a pure-torch reference in seqtopk.routing (same choices, slot for slot).

- CPU: compiled C++ ops (cpu/route.cpp with cpu/history.h: every routing rule of a step in one call, with the
  history write and the statistics; cpu/dispatch.cpp: the pair plan, combine and count groups). They are built
  by `seqtopk kernels --build` (g++ and ninja, under half a minute) and loaded by compiled.py.
- CUDA: Triton kernels (sequence_cut.py: the prefill cut per sequence; decode_step.py: a one-token decode step
  read from paged storage).

backend.py is the one place that decides, per device, which of them (or the torch reference) routes.
"""
