"""One fused GPU kernel for a SeqTopK decode step (streaming rule, one new token per sequence).

A decode step in eager PyTorch is launch-bound: the torch routing path spends ~20 small kernels per layer
where stock TopK spends ~5. This Triton kernel does, per sequence row and in one launch: top-cap candidates
from the softmax probabilities, the count of earlier capped scores above each candidate (the history
buffer), the streaming cut, the minimum, softmax-family weights, the weight-0 filling of unchosen slots, the
write of this step's scores into the history, and the routing-statistics histogram.

Its torch reference is seqtopk.routing.rules.select_causal: the decisions are equal on the same
probabilities (the comparisons are exact; only the order of exactly tied candidate experts may differ from
torch.topk), and the budget split is imported from there rather than re-derived. Unchosen slots follow the
"repeat_best" convention (rules.pack). Used by the transformers adapter on CUDA for softmax-scored families
when Triton is importable; everything else takes the torch path. On CPU, tests run it under Triton's
interpreter (TRITON_INTERPRET=1) against the torch rule.
"""

from __future__ import annotations

import torch

from seqtopk.routing.rules import budget_split

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def available(device: torch.device) -> bool:
    """Whether engines should take the fused step for tensors on `device` (CUDA with Triton).

    With TRITON_INTERPRET=1 set before this module is imported, `decode_step` also runs on CPU tensors, in
    Triton's interpreter: slow, for checking the math (tests do), never chosen by an engine."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _decode_step_kernel(probs_ptr, hist_ptr, seen_ptr, valid_ptr, ids_ptr, weights_ptr, mask_ptr,
                            stats_ptr, hist_rows, position,
                            E: tl.constexpr, BLOCK_E: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                            FIRST: tl.constexpr, FORCED: tl.constexpr, PER_TOKEN: tl.constexpr,
                            RENORM: tl.constexpr, SPILL: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        offs_e = tl.arange(0, BLOCK_E)
        work = tl.load(probs_ptr + row * E + offs_e, mask=offs_e < E, other=float("-inf"))
        offs_c = tl.arange(0, BLOCK_C)
        vals = tl.full([BLOCK_C], float("-inf"), tl.float32)
        ids = tl.zeros([BLOCK_C], tl.int32)
        for c in tl.static_range(C):  # top-C, best first
            best = tl.max(work, axis=0)
            where = tl.argmax(work, axis=0)
            vals = tl.where(offs_c == c, best, vals)
            ids = tl.where(offs_c == c, where, ids)
            work = tl.where(offs_e == where, float("-inf"), work)
        competing = (offs_c >= FIRST) & (offs_c < C)
        # Own better candidates (competing columns only).
        beats = (vals[None, :] > vals[:, None]) & competing[None, :]
        greater = tl.sum(beats.to(tl.int32), axis=1)
        # Earlier tokens: every competing column of the history buffer (-inf where empty or padding).
        base = hist_ptr + row * hist_rows * C
        total = hist_rows * C
        for start in range(0, total, BLOCK_H):
            offs_h = start + tl.arange(0, BLOCK_H)
            h = tl.load(base + offs_h, mask=offs_h < total, other=float("-inf"))
            h = tl.where((offs_h % C) >= FIRST, h, float("-inf"))
            greater += tl.sum((h[None, :] > vals[:, None]).to(tl.int32), axis=1)
        is_real = tl.load(valid_ptr + row) != 0
        seen = tl.load(seen_ptr + row) + is_real.to(tl.int64)
        take = competing & (greater.to(tl.int64) < seen * PER_TOKEN) & is_real
        chosen = (take | ((offs_c < FORCED) & is_real)) & (offs_c < C)
        weights = tl.where(chosen, vals, 0.0)
        if RENORM:
            total_w = tl.sum(weights, axis=0)
            weights = tl.where(total_w > 0, weights / total_w, 0.0)
        first_id = tl.sum(tl.where(offs_c == 0, ids, 0), axis=0)
        out = row * C + offs_c
        tl.store(ids_ptr + out, tl.where(chosen, ids, first_id).to(tl.int64), mask=offs_c < C)
        tl.store(weights_ptr + out, weights, mask=offs_c < C)
        tl.store(mask_ptr + out, chosen.to(tl.int8), mask=offs_c < C)
        tl.store(base + position * C + offs_c, tl.where(is_real, vals, float("-inf")), mask=offs_c < C)
        count = tl.sum(chosen.to(tl.int32), axis=0)
        tl.atomic_add(stats_ptr + tl.where(is_real, count, SPILL), 1)


def decode_step(probs: torch.Tensor, history: torch.Tensor, position: int, seen: torch.Tensor,
                valid: torch.Tensor, k: int, cap: int, min_experts: int, exact_budget: bool, renormalize: bool,
                stats_row: torch.Tensor):
    """Route one new token per row. probs [B, E] float32; history [B, S, cap] float32 (written at `position`);
    seen [B] real tokens before this one; valid [B]; stats_row: this layer's histogram row (spill bin last).

    Returns (filled ids [B, cap] int64, weights [B, cap] float32, mask [B, cap] bool).
    """
    batch, experts = probs.shape
    forced, first, per_token = budget_split(k, cap, min_experts, exact_budget)
    ids = torch.empty(batch, cap, dtype=torch.long, device=probs.device)
    weights = torch.empty(batch, cap, dtype=torch.float32, device=probs.device)
    mask = torch.empty(batch, cap, dtype=torch.int8, device=probs.device)
    _decode_step_kernel[(batch,)](
        probs, history, seen, valid, ids, weights, mask, stats_row, history.shape[1], position,
        E=experts, BLOCK_E=triton.next_power_of_2(experts), C=cap, BLOCK_C=triton.next_power_of_2(cap),
        FIRST=first, FORCED=forced, PER_TOKEN=per_token, RENORM=renormalize, SPILL=stats_row.numel() - 1,
        BLOCK_H=256,
    )
    return ids, weights, mask.bool()
