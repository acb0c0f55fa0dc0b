"""Run a transformers experts module on a PairPlan (seqtopk.routing.dispatch): chosen (token, expert) rows only.

- Modules that use transformers' `grouped_mm` experts implementation (its default) or `batched_mm` (which
  generate() switches to for decoding on GPUs), have the fused weights (`gate_up_proj`/`up_proj`,
  `down_proj`, `_apply_gate`) and are not expert-parallel take the grouped path: the rows, sorted by expert
  (the compiled CPU plan already is; the torch plan is sorted here), go through transformers' grouped GEMM
  helper, then `paths.combine` sums them per token with the routing weights. Each active expert's weights
  are read once, with no host sync.
- Every other module (the `eager` implementation, older module layouts, expert-parallel experts, or a
  transformers without the grouped helper) runs itself on the gathered rows as if each were a token with
  one expert at weight 1, and the rows are combined the same way.
"""

from __future__ import annotations

import torch

from seqtopk.kernels.paths import combine, gather_rows, plan
from seqtopk.routing.dispatch import PairPlan

try:  # transformers' grouped GEMM helper (5.x); without it every implementation takes the generic path
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_linear = None


def run_plan(experts: torch.nn.Module, original, hidden: torch.Tensor, pairs: PairPlan,
             path: str | None = None) -> torch.Tensor:
    """path: where the layer's routing ran (seqtopk.kernels.backend), for the row copies and the combine."""
    if _grouped_linear is not None and _uses_grouped_mm(experts):
        return _grouped(experts, hidden, pairs, path)
    rows = original(gather_rows(hidden, pairs.token, path), pairs.expert.long().unsqueeze(1),
                    torch.ones(pairs.rows, 1, dtype=hidden.dtype, device=hidden.device))
    return combine(rows.reshape(pairs.rows, -1), pairs, path)  # (DBRX's experts return [R, 1, H])


def run_chosen(experts: torch.nn.Module, original, hidden: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """hidden [N, H]; ids [N, C] with -1 in unchosen slots; weights [N, C]. Returns [N, H]."""
    mask = ids >= 0
    pairs = plan(ids.clamp(min=0), weights, mask, experts.num_experts, path=path)
    return run_plan(experts, original, hidden, pairs, path)


def _uses_grouped_mm(experts) -> bool:
    config = getattr(experts, "config", None)
    return (getattr(config, "_experts_implementation", None) in ("grouped_mm", "batched_mm")
            and not getattr(experts, "_is_expert_parallel", False)
            and hasattr(experts, "down_proj") and hasattr(experts, "_apply_gate"))


def _grouped(experts, hidden: torch.Tensor, pairs: PairPlan, path: str | None) -> torch.Tensor:
    pairs = pairs.by_expert(experts.num_experts)
    x = gather_rows(hidden, pairs.token, path)
    offsets = pairs.expert_end
    has_gate = getattr(experts, "has_gate", True)
    has_bias = getattr(experts, "has_bias", False)
    transposed = getattr(experts, "is_transposed", False)
    sorted_ids = pairs.expert.long()
    if has_gate:
        up_weight = experts.gate_up_proj
        up_bias = experts.gate_up_proj_bias[sorted_ids] if has_bias else None
    else:
        up_weight = experts.up_proj
        up_bias = experts.up_proj_bias[sorted_ids] if has_bias else None
    projected = _grouped_linear(x, up_weight, offsets, bias=up_bias, is_transposed=transposed)
    projected = experts._apply_gate(projected) if has_gate else experts.act_fn(projected)
    down_bias = experts.down_proj_bias[sorted_ids] if has_bias else None
    rows = _grouped_linear(projected, experts.down_proj, offsets, bias=down_bias, is_transposed=transposed)
    return combine(rows, pairs, path).to(hidden.dtype)
