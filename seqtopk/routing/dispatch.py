"""How chosen (token, expert) pairs reach MoE kernels, without padded work or host syncs. Pure torch.

SeqTopK gives each token between min_experts and cap experts. `plan_pairs` lists the chosen slots as R
rows of one expert each, token-major, and fixes R up front so nothing waits on the GPU:
- N*k, the exact total, under the sequence rule with an exact budget (and under plain TopK);
- N*cap, a static bound, for small steps (decode) on an accelerator: the spare (filler) rows carry weight 0
  and reuse the expert of the first chosen pair, which the step reads anyway, so a grouped GEMM reads no
  extra expert weights for them, and the GPU never waits on a host sync;
- otherwise the true count: one host sync, which costs nothing on the CPU, where rows cost real compute.
`combine_rows` sums the rows back per token in one gather + batched product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Accelerator steps with at most this many [token, slot] entries use the static bound N*cap.
SMALL_STEP_SLOTS = 4096


@dataclass
class PairPlan:
    token: torch.Tensor  # [R] token of each row
    expert: torch.Tensor  # [R] expert of each row (fillers: a real expert id, weight 0)
    weight: torch.Tensor  # [R] combine weight (0 for fillers)
    slot_row: torch.Tensor  # [N*cap] row holding each (token, slot), or 0 for unchosen slots
    slot_weight: torch.Tensor  # [N*cap] weight of each (token, slot), 0 for unchosen
    slot_mask: torch.Tensor  # [N*cap] chosen slots
    tokens: int
    cap: int

    def reordered(self, order: torch.Tensor) -> "PairPlan":
        """The same plan with rows permuted by `order` (row i of the new order is old row order[i])."""
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return PairPlan(token=self.token[order], expert=self.expert[order], weight=self.weight[order],
                        slot_row=inverse[self.slot_row], slot_weight=self.slot_weight, slot_mask=self.slot_mask,
                        tokens=self.tokens, cap=self.cap)


def row_count(mask: torch.Tensor, exact_total: int | None) -> int:
    """R for a [N, cap] mask: the known exact total; on an accelerator, the static bound for small steps;
    else the true count (a host sync, free on the CPU, where spare rows would cost real compute)."""
    if exact_total is not None:
        return exact_total
    if mask.device.type != "cpu" and mask.numel() <= SMALL_STEP_SLOTS:
        return mask.numel()
    return int(mask.sum())


def plan_pairs(ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, rows: int) -> PairPlan:
    """List the chosen slots of ids/weights [N, cap] as `rows` rows (token-major, fillers last)."""
    tokens, cap = ids.shape
    flat_mask = mask.reshape(-1)
    position = torch.cumsum(flat_mask, dim=0) - 1  # row of each chosen slot
    # Chosen slots land in their row; unchosen ones in a spill row `rows` that is cut off.
    target = torch.where(flat_mask, position, torch.full_like(position, rows))
    slot_index = torch.zeros(rows + 1, dtype=torch.long, device=ids.device)
    slot_index.scatter_(0, target, torch.arange(flat_mask.numel(), device=ids.device))
    slot_index = slot_index[:rows]
    real = torch.arange(rows, device=ids.device) < flat_mask.sum()
    flat_weights = weights.reshape(-1)
    weight = torch.where(real, flat_weights[slot_index], torch.zeros((), dtype=weights.dtype, device=ids.device))
    slot_row = torch.where(flat_mask, position, torch.zeros_like(position))
    slot_weight = torch.where(flat_mask, flat_weights, torch.zeros_like(flat_weights))
    expert = ids.reshape(-1)[slot_index]
    # Fillers take the first chosen pair's expert; only when nothing was chosen at all is that slot an
    # unchosen one (-1 under the "drop" convention), and then expert 0 stands in (weight 0 either way).
    expert = torch.where(real, expert, expert[:1]).clamp(min=0)
    return PairPlan(token=slot_index // cap, expert=expert, weight=weight, slot_row=slot_row,
                    slot_weight=slot_weight, slot_mask=flat_mask, tokens=tokens, cap=cap)


def combine_rows(rows: torch.Tensor, plan: PairPlan, weighted: bool = False) -> torch.Tensor:
    """Sum per token of expert output rows [R, H] (in plan order) -> [N, H], weighting them unless `weighted`.

    Gathers each (token, slot) row (unchosen slots read row 0 with weight 0), then one batched
    [1 x cap] @ [cap x H] product per token: a single pass, accumulated in float32 by the GEMM.
    """
    gathered = rows.index_select(0, plan.slot_row).view(plan.tokens, plan.cap, -1)
    w = plan.slot_mask if weighted else plan.slot_weight
    return torch.bmm(w.to(rows.dtype).view(plan.tokens, 1, plan.cap), gathered).squeeze(1)
