"""What a family adapter declares, and the few building blocks the family table (table.py) uses.

A family is fully described by where its routing call lives, how it computes router logits, which scoring
object (seqtopk.routing.scoring) carries its selection and weight convention, and what tuple its routing
call returns. SeqTopK replaces that one call; the MoE block around it and its experts are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Callable

import torch
import torch.nn.functional as F


def attr(obj, path: str):
    """getattr along a dotted path ("gate.top_k")."""
    return reduce(getattr, path.split("."), obj)


@dataclass(frozen=True)
class Family:
    name: str
    block_classes: tuple[str, ...]  # transformers MoE block classes of this family
    # Attribute of the block holding the module whose `route_method` is replaced ("" = the block itself).
    router_attr: str = "gate"
    # router, *the routing call's arguments -> router logits [N, E], computed exactly as the family does
    logits: Callable[..., torch.Tensor] | None = None
    # router, block -> scoring object (seqtopk.routing.scoring) with the family's scoring and weight convention
    scoring: Callable | None = None
    # router, logits, weights [N, C], ids [N, C], dtype of the call's first argument -> what the family's
    # routing call returns
    outputs: Callable | None = None
    scheme: str = ""  # one line for the support table: how the family scores and weighs its experts
    route_method: str = "forward"  # the replaced method; a few families route in a block method
    experts_attr: str = "experts"
    top_k_attr: str = "top_k"  # dotted paths from the router (see `router`)
    num_experts_attr: str = "num_experts"
    unsupported: str | None = None  # why this family cannot be patched, if it cannot
    module: str = ""  # the transformers model module (transformers.models.<module>), for the support table

    def router(self, block) -> torch.nn.Module:
        return attr(block, self.router_attr) if self.router_attr else block

    def experts(self, block) -> torch.nn.Module:
        return getattr(block, self.experts_attr)

    def top_k(self, block) -> int:
        return int(attr(self.router(block), self.top_k_attr))

    def num_experts(self, block) -> int:
        return int(attr(self.router(block), self.num_experts_attr))


# ----------------------------------------------------------------------------------------- router logits


def linear(weight: str = "weight", bias: str | None = None, upcast: str = "none", softcap: str | None = None):
    """Logits as `F.linear(hidden, router.<weight>)`, flattened to [N, hidden], with the family's casts:
    upcast "none" (model dtype), "input" (hidden and weight in float32: DeepSeek style), "output" (float32
    after the product: Granite style) or "weight" (hidden cast to the weight's dtype); `softcap` names the
    router attribute of a tanh logit soft-cap (Laguna), applied when > 0."""

    def logits(router, hidden, *_):
        w = attr(router, weight)
        b = attr(router, bias) if bias else None
        h = hidden.reshape(-1, w.shape[1])
        if upcast == "input":
            out = F.linear(h.float(), w.float(), None if b is None else b.float())
        elif upcast == "weight":
            out = F.linear(h.to(w.dtype), w, b)
        else:
            out = F.linear(h, w, b)
            out = out.float() if upcast == "output" else out
        cap = float(getattr(router, softcap)) if softcap else 0.0
        return torch.tanh(out / cap) * cap if cap > 0 else out

    return logits


def given_logits(position: int):
    """The routing call receives the logits as its `position`-th argument (block-level routing methods)."""
    return lambda router, *args: args[position]


# ----------------------------------------------------------------------------------------- outputs


def _cast(weights, logits, dtype, cast):
    if cast == "logits":
        return weights.to(logits.dtype)
    if cast == "input":  # the dtype of the routing call's first argument (the hidden states)
        return weights.to(dtype)
    return weights


def logits_first(cast: str | None = None):
    """(router_logits, weights, ids); weights cast to the logits' dtype ("logits"), the hidden states' ("input"),
    or left as computed (float32)."""

    def outputs(router, logits, weights, ids, dtype):
        return logits, _cast(weights, logits, dtype, cast), ids

    return outputs


def ids_first(cast: str | None = "input"):
    """(ids, weights, router_logits): Granite-MoE, -Hybrid, -Shared."""

    def outputs(router, logits, weights, ids, dtype):
        return ids, _cast(weights, logits, dtype, cast), logits

    return outputs
