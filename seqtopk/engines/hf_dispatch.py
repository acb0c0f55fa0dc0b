"""Run a transformers experts module on the chosen (token, expert) pairs only.

SeqTopK gives tokens between min_experts and cap experts, so a fixed-width [N, cap] call would compute
every unchosen slot. Instead the chosen pairs are listed (P of them) and only those rows are computed:
- with transformers' `grouped_mm` experts implementation (its default), the pairs are sorted by expert and
  fed straight to its grouped GEMMs, then summed per token in float32: the same memory traffic as stock
  TopK (one gather in, one reduction out) and no padded rows;
- with any other implementation (eager, batched_mm, ...), the module itself is called on the P gathered rows
  as if each were a token with one expert, and the rows are summed back per token.
"""

from __future__ import annotations

import torch

try:  # transformers' grouped GEMM helper (5.x); without it every implementation takes the generic path
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_linear = None


def run_chosen(experts: torch.nn.Module, original, hidden: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """hidden [N, H]; ids [N, C] with -1 in unchosen slots; weights [N, C]. Returns [N, H]."""
    token, slot = (ids >= 0).nonzero(as_tuple=True)  # token-major order
    if token.numel() == 0:
        return torch.zeros_like(hidden)
    pair_ids = ids[token, slot]
    pair_weights = weights[token, slot]
    if _grouped_linear is not None and _uses_grouped_mm(experts):
        return _grouped_pairs(experts, hidden, token, pair_ids, pair_weights)
    rows = original(hidden[token], pair_ids.unsqueeze(1), pair_weights.unsqueeze(1))
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, token, rows.float()).to(hidden.dtype)


def _uses_grouped_mm(experts) -> bool:
    config = getattr(experts, "config", None)
    return (getattr(config, "_experts_implementation", None) == "grouped_mm"
            and not getattr(experts, "_is_expert_parallel", False)
            and hasattr(experts, "down_proj") and hasattr(experts, "_apply_gate"))


def _grouped_pairs(experts, hidden, token, pair_ids, pair_weights):
    num_experts = experts.num_experts
    sorted_ids, order = torch.sort(pair_ids)
    rows_token = token[order]
    x = hidden[rows_token]
    # histc, not bincount: no host sync and static output size (as transformers does).
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
    rows = rows.float() * pair_weights[order].float().unsqueeze(-1)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, rows_token, rows).to(hidden.dtype)
