"""What a transformers forward needs to route by sequence: its view of the batch, and the routing history.

transformers flattens a batch to [B*T, H] before the router and gives MoE blocks no attention mask, so the
patch reads the structure at the model's forward (`ForwardView`) and hands it to each router explicitly.
The streaming rule's history (`RoutingState`) is tied to the KV-cache object and follows its reordering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqtopk.routing.rules import NEG_INF, TokenRules


@dataclass
class ForwardView:
    """The sequence structure of one model forward, as the routers need it."""

    batch: int
    tokens: int
    valid: torch.Tensor  # [B, T] real tokens
    seen: torch.Tensor  # [B] real tokens before this forward (earlier cache positions)
    continuing: bool  # the KV cache already held tokens
    state: "RoutingState | None"
    start: int = 0  # cache position of the first new token
    routed_layers: set = field(default_factory=set)

    def rules(self, cfg) -> TokenRules:
        return TokenRules.for_forward(cfg, self.continuing)

    @classmethod
    def standalone(cls, tokens: int, device) -> "ForwardView":
        """A router called outside a model forward (e.g. the block on its own): one sequence, no history."""
        return cls(1, tokens, torch.ones(1, tokens, dtype=torch.bool, device=device),
                   torch.zeros(1, dtype=torch.long, device=device), False, None)


class RoutingState:
    """Capped scores of every position routed so far, per layer, tied to one KV cache.

    Each layer keeps a preallocated [B, capacity, cap] buffer filled with -inf beyond `length` (padding
    positions are -inf too, so they never count as greater). Appending writes in place and doubles the
    capacity when full, so a decode step costs O(1) copies and the shapes routing sees change rarely.
    """

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}
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

    def append(self, layer: int, values: torch.Tensor, start: int) -> None:
        """Write values [B, L, cap] at positions start..start+L of this layer's history."""
        batch, length, cap = values.shape
        buffer = self.reserve(layer, start + length, batch, cap, values.device)
        buffer[:, start:start + length] = values

    def truncate(self, length: int) -> None:
        for buffer in self.buffers.values():
            buffer[:, length:] = NEG_INF
        self.length = min(self.length, length)

    def select(self, rows: torch.Tensor) -> None:
        self.buffers = {i: b.index_select(0, rows.to(b.device)) for i, b in self.buffers.items()}
        self.batch = int(rows.numel())

    def repeat_interleave(self, repeats: int) -> None:
        self.buffers = {i: b.repeat_interleave(repeats, dim=0) for i, b in self.buffers.items()}
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
