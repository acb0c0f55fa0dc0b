"""What a family adapter declares. Each field is a small function of the family's router module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Family:
    name: str
    block_classes: tuple[str, ...]  # transformers MoE block classes of this family
    router_attr: str  # attribute of the block that holds the router module
    # router, hidden -> router logits [N, E], computed exactly as the family's router does
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    # router -> scoring object (seqtopk.routing.scoring) carrying the family's scoring and weight convention
    scoring: Callable | None = None
    # router, logits, weights [N, C], ids [N, C] -> the tuple the family's router returns
    outputs: Callable | None = None
    experts_attr: str = "experts"
    top_k_attr: str = "top_k"
    num_experts_attr: str = "num_experts"
    unsupported: str | None = None  # why this family cannot be patched, if it cannot

    def router(self, block) -> torch.nn.Module:
        return getattr(block, self.router_attr)

    def experts(self, block) -> torch.nn.Module:
        return getattr(block, self.experts_attr)

    def top_k(self, block) -> int:
        return int(getattr(self.router(block), self.top_k_attr))

    def num_experts(self, block) -> int:
        return int(getattr(self.router(block), self.num_experts_attr))


def logits_first(router, logits, weights, ids):
    """Most families return (router_logits, weights, ids)."""
    return logits, weights, ids
