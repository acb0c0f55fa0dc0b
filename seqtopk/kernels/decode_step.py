"""One fused GPU kernel (Triton) for a SeqTopK decode step: one new token per sequence, streaming rule, paged history.

A decode step in eager PyTorch is launch-bound: the torch routing path spends ~20 small kernels per layer
where stock TopK spends ~5, and it gathers each row's history into a dense tensor first. This kernel does,
per token and in one launch, reading the history straight from paged storage through the block table (the
row's history length is read on the device, so the launch has the same shape whatever the contexts; it can
be captured in a CUDA graph and replayed with new layouts):
- from probabilities (softmax-scored families): top-cap candidates, the cut, the minimum, the weights
  (renormalised or raw), unchosen slots filled with the best expert at weight 0 ("repeat_best");
- from candidate values (any family: the scoring stays in torch): the choice only;
- the count of earlier capped scores above each candidate, the write of this step's scores into the store,
  and optionally a histogram of experts per token.

Its torch reference is seqtopk.routing.rules.select_causal over the gathered history
(seqtopk.routing.paged.gather_paged): the decisions are equal on the same inputs (the comparisons are exact
integer counts, and argmax's leftmost tie gives exactly tied candidates the lower expert first, the order of
rules.capped_candidates), and the budget split comes from rules.budget_split. seqtopk.routing.paged decides
when it runs (CUDA tensors with Triton); on CPU, tests run it under Triton's interpreter (TRITON_INTERPRET=1)
against the torch rule.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

BLOCK_HISTORY = 32  # history positions compared per loop iteration


def available(device: torch.device) -> bool:
    """Whether engines should take the fused step for tensors on `device` (CUDA with Triton).

    With TRITON_INTERPRET=1 set before this module is imported, `paged_decode` also runs on CPU tensors, in
    Triton's interpreter: slow, for checking the math (tests do), never chosen by an engine."""
    return triton is not None and device.type == "cuda"


# Triton reads TRITON_INTERPRET when a kernel module is imported, so it is read once here too.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on `device` at all: where `available`, and on CPU under Triton's interpreter,
    which only a forced path uses (seqtopk.kernels.backend.forced: tests and the differential checker)."""
    return available(device) or (INTERPRETED and torch.device(device).type == "cpu")


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(scores_ptr, store_ptr, table_ptr, length_ptr, seen_ptr, valid_ptr, slots_ptr,
                             values_ptr, ids_ptr, weights_ptr, mask_ptr, stats_ptr,
                             table_rows, table_width, block_size,
                             E: tl.constexpr, BLOCK_E: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                             FIRST: tl.constexpr, FORCED: tl.constexpr, PER_TOKEN: tl.constexpr,
                             FROM_PROBS: tl.constexpr, RENORM: tl.constexpr, WRITE: tl.constexpr,
                             HAS_STATS: tl.constexpr, SPILL: tl.constexpr, BLOCK_H: tl.constexpr):
        n = tl.program_id(0)
        offs_c = tl.arange(0, BLOCK_C)
        in_cap = offs_c < C
        ids = tl.zeros([BLOCK_C], tl.int32)
        if FROM_PROBS:
            offs_e = tl.arange(0, BLOCK_E)
            work = tl.load(scores_ptr + n * E + offs_e, mask=offs_e < E, other=float("-inf"))
            vals = tl.full([BLOCK_C], float("-inf"), tl.float32)
            for c in tl.static_range(C):  # top-C, best first
                best = tl.max(work, axis=0)
                where = tl.argmax(work, axis=0)
                vals = tl.where(offs_c == c, best, vals)
                ids = tl.where(offs_c == c, where, ids)
                work = tl.where(offs_e == where, float("-inf"), work)
        else:
            vals = tl.load(scores_ptr + n * C + offs_c, mask=in_cap, other=float("-inf")).to(tl.float32)
        competing = (offs_c >= FIRST) & in_cap
        # the token's own better candidates (competing columns only)
        beats = (vals[None, :] > vals[:, None]) & competing[None, :]
        greater = tl.sum(beats.to(tl.int32), axis=1)
        is_real = tl.load(valid_ptr + n) != 0
        length = tl.where(is_real, tl.load(length_ptr + n), 0)
        row = tl.minimum(n, table_rows - 1).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        # the row's earlier tokens, BLOCK_H positions at a time, through its block table
        for start in range(0, length, BLOCK_H):
            pos = start + offs_h
            live = pos < length
            block = tl.minimum(pos // block_size, table_width - 1)
            block_id = tl.load(table_ptr + row * table_width + block, mask=live, other=0).to(tl.int64)
            slot = block_id * block_size + pos % block_size
            tile = tl.load(store_ptr + slot[:, None] * C + offs_c[None, :],
                           mask=live[:, None] & competing[None, :], other=float("-inf"))
            flat = tl.reshape(tile, [BLOCK_H * BLOCK_C])
            greater += tl.sum((flat[None, :] > vals[:, None]).to(tl.int32), axis=1)
        seen = tl.load(seen_ptr + n).to(tl.int64) + is_real.to(tl.int64)
        take = competing & (greater.to(tl.int64) < seen * PER_TOKEN) & is_real
        chosen = (take | ((offs_c < FORCED) & is_real)) & in_cap
        out = n * C + offs_c
        tl.store(mask_ptr + out, chosen.to(tl.int8), mask=in_cap)
        if FROM_PROBS:
            weights = tl.where(chosen, vals, 0.0)
            if RENORM:
                total = tl.sum(weights, axis=0)
                weights = tl.where(total > 0, weights / total, 0.0)
            best_id = tl.sum(tl.where(offs_c == 0, ids, 0), axis=0)
            tl.store(ids_ptr + out, tl.where(chosen, ids, best_id), mask=in_cap)
            tl.store(weights_ptr + out, weights, mask=in_cap)
            tl.store(values_ptr + out, vals, mask=in_cap)
        if WRITE:  # this step's scores at the token's slot (padding: slot < 0, nothing written)
            slot_n = tl.load(slots_ptr + n).to(tl.int64)
            tl.store(store_ptr + slot_n * C + offs_c, tl.where(is_real, vals, float("-inf")),
                     mask=in_cap & (slot_n >= 0))
        if HAS_STATS:
            count = tl.sum(chosen.to(tl.int32), axis=0)
            tl.atomic_add(stats_ptr + tl.where(is_real, count, SPILL), 1)


def _per_token(values: torch.Tensor | None, tokens: int, dtype, device) -> torch.Tensor:
    """[R] -> [tokens] (rows past R are padding tokens: 0)."""
    if values is None:
        return torch.zeros(tokens, dtype=dtype, device=device)
    values = values.to(dtype)
    if values.shape[0] >= tokens:
        return values[:tokens].contiguous()
    return torch.nn.functional.pad(values, (0, tokens - values.shape[0]))


def paged_decode(scores: torch.Tensor, store: torch.Tensor, block_table: torch.Tensor, block_size: int,
                 length: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor, split, *, cap: int,
                 from_probs: bool, renormalize: bool = False, write_slots: torch.Tensor | None = None,
                 stats_row: torch.Tensor | None = None):
    """Route one new token per row from paged history. Token n belongs to row n (n < R, the block table's rows).

    scores: [N, E] float32 probabilities (from_probs) or [N, cap] candidate values, best first.
    store: [slots, cap] float32 history (written at write_slots when given); block_table [R, max_blocks];
    length: [R] history positions per row; seen: [R] real earlier tokens (the budget is (seen + 1) * per_token);
    valid: [N] bool real tokens; split: rules.BudgetSplit; stats_row: histogram of experts per token
    (spill bin last, for padding tokens).

    Returns from_probs: (values [N, cap] float32, weights [N, cap] float32, ids [N, cap] int32, mask bool);
    otherwise the mask [N, cap] bool.
    """
    if getattr(split, "scale", 1) != 1:
        raise ValueError("the Triton decode step takes a whole per-token budget; a fractional k runs on the torch rule")
    tokens = scores.shape[0]
    device = scores.device
    mask = torch.empty(tokens, cap, dtype=torch.int8, device=device)
    if from_probs:
        values = torch.empty(tokens, cap, dtype=torch.float32, device=device)
        weights = torch.empty_like(values)
        ids = torch.empty(tokens, cap, dtype=torch.int32, device=device)
    else:
        values = weights = ids = mask  # unused pointers
    table = block_table.to(torch.int32).contiguous()
    experts = scores.shape[1]
    if tokens:
        _paged_decode_kernel[(tokens,)](
            scores.contiguous(), store, table, _per_token(length, tokens, torch.int64, device),
            _per_token(seen, tokens, torch.int64, device), valid.to(torch.int8).contiguous(),
            write_slots.long().contiguous() if write_slots is not None else mask,
            values, ids, weights, mask, stats_row if stats_row is not None else mask,
            table.shape[0], table.shape[1], block_size,
            E=experts, BLOCK_E=triton.next_power_of_2(experts), C=cap, BLOCK_C=triton.next_power_of_2(cap),
            FIRST=split.first, FORCED=split.forced, PER_TOKEN=split.per_token, FROM_PROBS=from_probs,
            RENORM=renormalize, WRITE=write_slots is not None, HAS_STATS=stats_row is not None,
            SPILL=stats_row.numel() - 1 if stats_row is not None else 0, BLOCK_H=BLOCK_HISTORY,
        )
    if from_probs:
        return values, weights, ids, mask.bool()
    return mask.bool()
