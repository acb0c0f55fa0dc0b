"""The streaming rule's history in paged storage, addressed like a paged KV cache. Pure torch (+ optional fused
kernels: compiled C++ on CPU, Triton on CUDA); no engine imports.

Each layer keeps the capped scores of every token it routed in a store with one row per slot; a row's
earlier tokens are found through its block table (slot = block_id * block_size + offset), up to its history
length. The history therefore lives and dies with the sequence's cache blocks. A dense per-sequence buffer
[B, S, C] is the special case of one block per row (`PagedLayout.dense`).

`PagedLayout` is what one step knows about where histories are (shared by every layer of the step);
`PagedHistory` is one layer's store seen through it. The streaming rule (seqtopk.routing.rules.select_causal)
takes a PagedHistory: a one-token step is decided by a fused kernel straight from the store where one serves
the device (the compiled C++ kernel on CPU when built, seqtopk.kernels.compiled; the Triton kernel on CUDA,
seqtopk.kernels.decode_step; same decisions), anything else gathers the history and runs the torch rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtopk.kernels import compiled
from seqtopk.kernels import decode_step as fused_gpu

NEG_INF = float("-inf")


def history_slots(block_table: torch.Tensor, block_size: int, context: torch.Tensor, width: int,
                  num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's history lives in paged storage: (slot [R, width], live [R, width]).

    Slots follow a paged KV cache: slot = block_id * block_size + offset, block ids from block_table
    [R, max_blocks]. Positions at or past a row's context are not live (their slot is clamped, unread).
    The same slots serve every layer of a step, so engines compute them once per step.
    """
    rows = context.shape[0]
    position = torch.arange(width, device=block_table.device)
    block = (position // block_size).clamp(max=block_table.shape[1] - 1)
    slot = block_table[:rows].long().gather(1, block.unsqueeze(0).expand(rows, width)) * block_size
    slot = (slot + position % block_size).clamp(0, num_slots - 1)
    return slot, position.unsqueeze(0) < context.unsqueeze(1)


def gather_paged(store: torch.Tensor, slot: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """History of each row from paged storage ([slots, C]): [R, width, C], -inf where not live."""
    return store[slot].masked_fill(~live.unsqueeze(-1), NEG_INF)


def write_paged(store: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Store each token's capped scores at its slot; negative slots (padding) go to the store's last row,
    which is kept as scratch and never read as history."""
    scratch = torch.full_like(slots, store.shape[0] - 1)
    store.index_copy_(0, torch.where(slots >= 0, slots.long(), scratch.long()), values.to(store.dtype))


@dataclass
class PagedLayout:
    """Where each row's history is, for one step: shared by every layer."""

    block_table: torch.Tensor  # [R, max_blocks] int32
    block_size: int
    length: torch.Tensor  # [R] int64: history positions of each row (its context)
    width: int  # host int >= every length: the dense width a gather produces
    num_slots: int  # rows of each layer's store
    write_slots: torch.Tensor | None = None  # [N] where this step's tokens are recorded (-1: padding)
    _slots: tuple | None = None

    @classmethod
    def dense(cls, buffer: torch.Tensor, length: int) -> "PagedLayout":
        """Rows of a dense [B, S, C] buffer (one block of S positions per row), `length` positions each."""
        rows, positions = buffer.shape[:2]
        length = min(length, positions)
        table = torch.arange(rows, dtype=torch.int32, device=buffer.device).unsqueeze(1)
        return cls(table, positions, torch.full((rows,), length, dtype=torch.long, device=buffer.device),
                   length, rows * positions)

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, live) [R, width] of the gather, computed once per step."""
        if self._slots is None:
            self._slots = history_slots(self.block_table, self.block_size, self.length, self.width, self.num_slots)
        return self._slots

    def of(self, store: torch.Tensor) -> "PagedHistory":
        return PagedHistory(store, self)


@dataclass
class PagedHistory:
    """One layer's store ([num_slots, C] capped scores) seen through a step's layout."""

    store: torch.Tensor
    layout: PagedLayout

    def gather(self) -> torch.Tensor | None:
        """[R, width, C], -inf past each row's length; None when no row has a history."""
        if self.layout.width <= 0:
            return None
        return gather_paged(self.store, *self.layout.slots())

    def record(self, values: torch.Tensor) -> None:
        """Store this step's capped scores [N, C] at the tokens' slots (layout.write_slots)."""
        if self.layout.write_slots is not None:
            write_paged(self.store, self.layout.write_slots, values)

    def single_token_choice(self, values: torch.Tensor, seen: torch.Tensor, split,
                            valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """The streaming rule for one new token per row, from a fused kernel straight from the store: bool [N, C],
        or None when no kernel serves this device (the caller gathers and runs the torch rule). values: [N, C]
        float32, token n of row n; seen: [R] real earlier tokens (the budget is (seen + 1) * per_token); split:
        rules.BudgetSplit; valid: [N] real tokens (None: all). Nothing is recorded (the caller records the step's values)."""
        if values.dtype != torch.float32:
            return None
        layout = self.layout
        if compiled.paged_decode_available(values.device):
            mask = torch.ops.seqtopk_cpu.paged_causal_decode(
                values, self.store, layout.block_table.contiguous(), layout.block_size, layout.length.contiguous(),
                seen.long().contiguous(), split.forced, split.first, split.per_token)
            return mask if valid is None else mask & valid.unsqueeze(-1)
        if fused_gpu.available(values.device):
            return fused_gpu.paged_decode(values, self.store, layout.block_table, layout.block_size, layout.length,
                                          seen, _all_real(values, valid), split,
                                          cap=values.shape[1], from_probs=False)
        return None

    def softmax_decode_step(self, probs: torch.Tensor, seen: torch.Tensor, cap: int, split, renormalize: bool,
                            valid: torch.Tensor | None = None):
        """A whole one-token step of a softmax-scored layer in a fused kernel, this step's scores recorded:
        (values, weights, ids int32, mask) [N, C] with unchosen slots repeating the best expert at weight 0;
        None when no kernel serves this device. probs: [N, E] float32, token n of row n (rows past R: padding);
        valid: [N] real tokens (None: the first R)."""
        layout = self.layout
        if layout.write_slots is None or probs.dtype != torch.float32:
            return None
        if compiled.paged_decode_available(probs.device):
            values, weights, ids, mask = torch.ops.seqtopk_cpu.softmax_decode_step(
                probs, self.store, layout.block_table.contiguous(), layout.block_size, layout.length.contiguous(),
                seen.long().contiguous(), layout.write_slots.long().contiguous(), cap, split.forced, split.first,
                split.per_token, renormalize)
            if valid is not None:  # rows the kernel counts as real but the step calls padding
                keep = valid.unsqueeze(-1)
                mask, weights = mask & keep, weights * keep
            return values, weights, ids, mask
        if fused_gpu.available(probs.device):
            if valid is None:
                valid = torch.arange(probs.shape[0], device=probs.device) < layout.length.shape[0]
            return fused_gpu.paged_decode(probs, self.store, layout.block_table, layout.block_size, layout.length,
                                          seen, valid, split, cap=cap, from_probs=True, renormalize=renormalize,
                                          write_slots=layout.write_slots)
        return None


def _all_real(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return valid if valid is not None else torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
