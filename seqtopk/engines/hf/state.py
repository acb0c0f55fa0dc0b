"""What a transformers forward needs to route by sequence: its view of the batch, and the routing history.

transformers flattens a batch to [B*T, H] before the router and gives MoE blocks no attention mask, so the
patch reads the structure at the model's forward (`ForwardView`) and hands it to each router explicitly.
The streaming rule's history (`RoutingState`) is tied to the KV-cache object and follows its reordering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqtopk.kernels.paths import new_bands
from seqtopk.routing.paged import NEG_INF, PagedHistory, PagedLayout, mark_stale
from seqtopk.routing.router import DenseLayout
from seqtopk.routing.rules import TokenRules


@dataclass
class ForwardView:
    """The sequence structure of one model forward, as the routers need it (built once per forward)."""

    batch: int
    tokens: int
    valid: torch.Tensor  # [B, T] real tokens
    seen: torch.Tensor  # [B] real tokens before this forward (earlier cache positions)
    continuing: bool  # the KV cache already held tokens
    state: "RoutingState | None"
    start: int = 0  # cache position of the first new token
    routed_layers: set = field(default_factory=set)
    _rules: dict = field(default_factory=dict)
    _layout: DenseLayout | None = None
    _paged: dict = field(default_factory=dict)

    def rules(self, cfg) -> TokenRules:
        key = (cfg.prefill, cfg.decode)
        if key not in self._rules:
            self._rules[key] = TokenRules.for_forward(cfg, self.continuing)
        return self._rules[key]

    @property
    def layout(self) -> DenseLayout:
        if self._layout is None:
            self._layout = DenseLayout(self.batch, self.tokens, self.valid, self.seen if self.continuing else None)
        return self._layout

    def history(self, layer: int, cap: int, device) -> PagedHistory | None:
        """The layer's history as paged storage (one block per row), with this forward's tokens' write slots
        (positions start..start+T) and the rows' decode bands; None without a routing state."""
        if self.state is None:
            return None
        buffer = self.state.reserve(layer, self.start + self.tokens, self.batch, cap, device)
        positions = buffer.shape[1]
        paged = self._paged.get(positions)
        if paged is None:
            rows = torch.arange(self.batch, device=device)
            write = (rows.unsqueeze(1) * positions + self.start + torch.arange(self.tokens, device=device)).reshape(-1)
            paged = self._paged[positions] = PagedLayout.dense(buffer, self.start, write_slots=write, row_band=rows)
        # Decode bands serve the compiled CPU kernel only (as in the vLLM worker): none on other devices.
        bands = self.state.bands_of(layer, self.batch, device) if torch.device(device).type == "cpu" else None
        return paged.of(buffer.view(-1, cap), bands)

    @classmethod
    def standalone(cls, tokens: int, device) -> "ForwardView":
        """A router called outside a model forward (e.g. the block on its own): one sequence, no history."""
        return cls(1, tokens, torch.ones(1, tokens, dtype=torch.bool, device=device),
                   torch.zeros(1, dtype=torch.long, device=device), False, None)


class RoutingState:
    """Capped scores of every position routed so far, per layer, tied to one KV cache.

    Each layer keeps a preallocated [B, capacity, cap] buffer filled with -inf beyond `length` (padding
    positions are -inf too, so they never count as greater), written in place by the routing call; the
    capacity doubles when full, so a decode step costs O(1) copies. Next to it, one decode band per row
    (seqtopk.routing.paged): the bands follow the cache's reordering, and are marked stale when it is cropped.
    """

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}
        self.bands: dict[int, torch.Tensor] = {}
        self.length = 0
        self.batch: int | None = None

    def history(self, layer: int) -> torch.Tensor | None:
        return self.buffers.get(layer)

    def reserve(self, layer: int, stop: int, batch: int, cap: int, device) -> torch.Tensor:
        """This layer's buffer, grown (doubling) to hold positions < stop."""
        buffer = self.buffers.get(layer)
        if buffer is None or buffer.shape[1] < stop:
            grown = torch.full((batch, max(64, 2 * stop), cap), NEG_INF, dtype=torch.float32, device=device)
            if buffer is not None:
                grown[:, : buffer.shape[1]] = buffer
            self.buffers[layer] = buffer = grown
        self.batch = batch
        return buffer

    def bands_of(self, layer: int, batch: int, device) -> torch.Tensor:
        bands = self.bands.get(layer)
        if bands is None or bands.shape[0] != batch:
            self.bands[layer] = bands = new_bands(batch, device)
        return bands

    def truncate(self, length: int) -> None:
        for buffer in self.buffers.values():
            buffer[:, length:] = NEG_INF
        for bands in self.bands.values():
            mark_stale(bands)
        self.length = min(self.length, length)

    def select(self, rows: torch.Tensor) -> None:
        self.buffers = {i: b.index_select(0, rows.to(b.device)) for i, b in self.buffers.items()}
        self.bands = {i: b.index_select(0, rows.to(b.device)) for i, b in self.bands.items()}
        self.batch = int(rows.numel())

    def repeat_interleave(self, repeats: int) -> None:
        self.buffers = {i: b.repeat_interleave(repeats, dim=0) for i, b in self.buffers.items()}
        self.bands = {i: b.repeat_interleave(repeats, dim=0) for i, b in self.bands.items()}
        if self.batch is not None:
            self.batch *= repeats


def follow_cache(cache, state: RoutingState) -> None:
    """Make batch-reordering calls on `cache` apply to `state` too (beam search, contrastive search).

    Wraps three methods on this cache instance only (not its class), so other caches are untouched.
    """
    for method, action in (("reorder_cache", state.select), ("batch_select_indices", state.select),
                           ("batch_repeat_interleave", state.repeat_interleave)):
        original = getattr(cache, method, None)
        if original is None:
            continue
        original = getattr(original, "_seqtopk_original", original)

        def follow(arg, _original=original, _action=action):
            _original(arg)
            _action(arg)

        follow._seqtopk_original = original
        setattr(cache, method, follow)
