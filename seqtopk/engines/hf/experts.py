"""Run a transformers experts module on a PairPlan (seqtopk.routing.dispatch): chosen (token, expert) rows only.

- Modules that use transformers' `grouped_mm` experts implementation (its default) or `batched_mm` (which
  generate() switches to for decoding on GPUs), have the fused weights (`gate_up_proj`/`up_proj`,
  `down_proj`, `_apply_gate`) and are not expert-parallel take the grouped path: the rows are sorted by
  expert and fed to transformers' grouped GEMM helper, then combined per token in one pass. Each active
  expert's weights are read once, there is no host sync, and no more memory traffic than stock TopK's own
  gather / weight / sum. (batched_mm itself would copy an expert's weights for every row; the grouped GEMM
  measured faster at decode batch 32, see evals/results.)
- Every other module (the `eager` implementation, older module layouts, expert-parallel experts, or a
  transformers without the grouped helper) runs itself on the gathered rows as if each were a token with
  one expert, and the rows are summed back per token.
"""

from __future__ import annotations

import torch

from seqtopk.routing.dispatch import PairPlan, combine_rows, plan_pairs, row_count

try:  # transformers' grouped GEMM helper (5.x); without it every implementation takes the generic path
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_linear = None


def run_plan(experts: torch.nn.Module, original, hidden: torch.Tensor, plan: PairPlan) -> torch.Tensor:
    if _grouped_linear is not None and _uses_grouped_mm(experts):
        return _grouped(experts, hidden, plan)
    rows = original(hidden[plan.token], plan.expert.unsqueeze(1), plan.weight.unsqueeze(1))
    return combine_rows(rows, plan, weighted=True).to(hidden.dtype)


def run_chosen(experts: torch.nn.Module, original, hidden: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """hidden [N, H]; ids [N, C] with -1 in unchosen slots; weights [N, C]. Returns [N, H]."""
    mask = ids >= 0
    plan = plan_pairs(ids, weights, mask, row_count(mask, None))
    return run_plan(experts, original, hidden, plan)


def _uses_grouped_mm(experts) -> bool:
    config = getattr(experts, "config", None)
    return (getattr(config, "_experts_implementation", None) in ("grouped_mm", "batched_mm")
            and not getattr(experts, "_is_expert_parallel", False)
            and hasattr(experts, "down_proj") and hasattr(experts, "_apply_gate"))


def _grouped(experts, hidden: torch.Tensor, plan: PairPlan) -> torch.Tensor:
    num_experts = experts.num_experts
    sorted_ids, order = torch.sort(plan.expert)
    plan = plan.reordered(order)
    x = hidden[plan.token]
    # histc, not bincount: no host sync and a static output size (as transformers does).
    counts_input = sorted_ids.float() if hidden.device.type in ("cpu", "mps") else sorted_ids.int()
    per_expert = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    has_gate = getattr(experts, "has_gate", True)
    has_bias = getattr(experts, "has_bias", False)
    transposed = getattr(experts, "is_transposed", False)
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
    return combine_rows(rows, plan).to(hidden.dtype)
