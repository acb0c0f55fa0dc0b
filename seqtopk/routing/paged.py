"""The streaming rule's history in paged storage, addressed like a paged KV cache. Pure torch; no engine imports.

Each layer keeps the capped scores of every token it routed in a store with one row per slot; a row's
earlier tokens are found through its block table (slot = block_id * block_size + offset), up to its history
length. The history therefore lives and dies with the sequence's cache blocks. A dense per-sequence buffer
[B, S, C] is the special case of one block per row (`PagedLayout.dense`).

`PagedLayout` is what one step knows about where histories are (shared by every layer of the step);
`PagedHistory` is one layer's store seen through it, optionally with the layer's decode bands: a cache, per
(sequence, layer), of the history around the streaming cut, which the compiled CPU kernel keeps so that a decode
step does not walk the whole history (seqtopk/kernels/cpu/history.h). The store stays the source of truth: a
band that does not match it is rebuilt from it. The torch reference (seqtopk.routing.rules.select_causal)
gathers the history (`PagedHistory.gather`) and ignores bands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")  # a score no token offers: empty history rows, padding, masked groups (every module reads it here)


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


def mark_stale(bands: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Mark bands (all, or `rows`) stale: their first field, the history length they reflect, becomes -1."""
    if rows is None:
        bands[:, :8] = 255  # int64 -1, little-endian
    else:
        bands[rows, :8] = 255


@dataclass
class PagedLayout:
    """Where each row's history is, for one step: shared by every layer."""

    block_table: torch.Tensor  # [R, max_blocks] int32
    block_size: int
    length: torch.Tensor  # [R] int64: history positions of each row (its context)
    width: int  # host int >= every length: the dense width a gather produces
    num_slots: int  # rows of each layer's store
    write_slots: torch.Tensor | None = None  # [N] where this step's tokens are recorded (-1: padding)
    row_band: torch.Tensor | None = None  # [R] int64: each row's decode band (-1: none)
    _slots: tuple | None = None
    _kernel: dict = field(default_factory=dict)

    @classmethod
    def dense(cls, buffer: torch.Tensor, length: int, write_slots: torch.Tensor | None = None,
              row_band: torch.Tensor | None = None) -> "PagedLayout":
        """Rows of a dense [B, S, C] buffer (one block of S positions per row), `length` positions each."""
        rows, positions = buffer.shape[:2]
        length = min(length, positions)
        table = torch.arange(rows, dtype=torch.int32, device=buffer.device).unsqueeze(1)
        return cls(table, positions, torch.full((rows,), length, dtype=torch.long, device=buffer.device),
                   length, rows * positions, write_slots=write_slots, row_band=row_band)

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, live) [R, width] of the gather, computed once per step."""
        if self._slots is None:
            self._slots = history_slots(self.block_table, self.block_size, self.length, self.width, self.num_slots)
        return self._slots

    def kernel_args(self) -> dict:
        """The layout as the compiled kernel takes it (contiguous, its dtypes), converted once per step."""
        if not self._kernel:
            self._kernel.update(
                block_table=self.block_table.to(torch.int32).contiguous(), block_size=int(self.block_size),
                row_length=self.length.to(torch.long).contiguous(),
                write_slots=None if self.write_slots is None else self.write_slots.to(torch.long).contiguous(),
                row_band=None if self.row_band is None else self.row_band.to(torch.long).contiguous())
        return self._kernel

    def of(self, store: torch.Tensor, bands: torch.Tensor | None = None) -> "PagedHistory":
        return PagedHistory(store, self, bands)


@dataclass
class PagedHistory:
    """One layer's store ([num_slots, C] capped scores) seen through a step's layout, with its decode bands
    ([sequences, band bytes] uint8, seqtopk.kernels.paths.new_bands) when the engine keeps them."""

    store: torch.Tensor
    layout: PagedLayout
    bands: torch.Tensor | None = None

    def gather(self) -> torch.Tensor | None:
        """[R, width, C], -inf past each row's length; None when no row has a history."""
        if self.layout.width <= 0:
            return None
        return gather_paged(self.store, *self.layout.slots())

    def record(self, values: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Store this step's capped scores [N, C] at the tokens' slots (layout.write_slots); tokens that are not
        real (real [N] False) are stored as -inf. Bands are not updated: they no longer match the store, so the
        kernel rebuilds them."""
        if self.layout.write_slots is None:
            return
        if real is not None:
            values = values.masked_fill(~real.unsqueeze(-1), NEG_INF)
        write_paged(self.store, self.layout.write_slots, values)
