"""seqtopk: route MoE experts by sequence, not by token.

    import seqtopk
    seqtopk.patch(model)                 # a transformers MoE model, in place
    out = model.generate(...)
    print(seqtopk.routing_stats(model))  # experts per token, per layer
    seqtopk.unpatch(model)

How a token is routed is decided in `seqtopk.routing.rules` (torch only); engine adapters live in
`seqtopk.engines` (hf/, vllm/), the table of MoE families in `seqtopk.patches` (table.py), the
compiled and Triton routing kernels in `seqtopk.kernels`, sparse embedding heads in `seqtopk.sparse`.
"""

from __future__ import annotations

from contextlib import contextmanager

from seqtopk.config import SeqTopKConfig

__version__ = "0.1.0"
__all__ = [
    "SeqTopKConfig",
    "patch",
    "unpatch",
    "patched",
    "topk_at",
    "is_patched",
    "routing_stats",
    "reset_routing_stats",
    "trace_routing",
]


def patch(model, **settings):
    """Switch a transformers MoE model to SeqTopK routing, in place; returns the model.

    settings: SeqTopKConfig's fields (k, cap, min_experts, exact_budget, prefill, decode), whose defaults and
    meaning live there alone. Idempotent: patching again replaces the previous settings. Settings are
    validated against every MoE layer before anything is changed.
    """
    from seqtopk.engines.hf import patch_model

    return patch_model(model, SeqTopKConfig.from_dict(settings))


def unpatch(model):
    """Restore the model's own routing exactly; returns the model. A no-op on an unpatched model."""
    from seqtopk.engines.hf import unpatch_model

    return unpatch_model(model)


def is_patched(model) -> bool:
    from seqtopk.engines.hf import find_patch

    return find_patch(model) is not None


@contextmanager
def patched(model, **settings):
    """`with seqtopk.patched(model, k=2, cap=4):` routes by sequence inside the block only."""
    patch(model, **settings)
    try:
        yield model
    finally:
        unpatch(model)


@contextmanager
def topk_at(model, k: int):
    """`with seqtopk.topk_at(model, 1):` stock TopK with k experts per token inside the block: the baseline for a
    SeqTopK budget below the model's top_k. Routes as the model loaded with its top_k set to k (the same tokens,
    tested), without reloading it: every token keeps its best k experts, weighted by the family's own rule."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"TopK takes a whole number of experts per token >= 1, got {k!r}")
    with patched(model, k=k, cap=k, decode="topk"):
        yield model


def routing_stats(model):
    """Routing statistics accumulated since patching (or the last reset): see seqtopk.routing.stats.RoutingStats."""
    from seqtopk.engines.hf import require_patch

    return require_patch(model).stats.snapshot()


def reset_routing_stats(model) -> None:
    from seqtopk.engines.hf import require_patch

    require_patch(model).stats.reset()


@contextmanager
def trace_routing(model):
    """Record experts per token for every forward inside the block (e.g. one generate call).

    Yields a seqtopk.routing.stats.RoutingTrace: `trace.forwards[i].ids` holds forward i's chosen expert ids,
    [layers, batch, tokens, cap] (-1 = unchosen), and `trace.experts_per_token()` the experts each token took,
    [layers, batch, tokens], over all recorded forwards (they must share a batch size).
    """
    from seqtopk.engines.hf import require_patch

    stats = require_patch(model).stats
    trace = stats.start_trace()
    try:
        yield trace
    finally:
        stats.stop_trace()
