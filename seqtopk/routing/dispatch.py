"""How chosen (token, expert) pairs reach MoE kernels, without padded work, and how their outputs come back.

SeqTopK gives each token between min_experts and cap experts. Two ways to run only the chosen pairs:

- rows (`PairPlan`; `plan_pairs`, `combine_torch`): the chosen slots as R rows of one expert each, for experts
  that take a ragged list of rows per expert (grouped GEMMs: transformers' grouped_mm, a GPU fused-MoE kernel
  with top-1). The rows run unweighted and the combine sums them back per token with the routing weights,
  accumulating in float32.
  On the CPU (compiled kernels) the plan is sorted by expert with each expert's end offset, as grouped GEMMs
  take it; the torch reference (`plan_pairs`) lists rows token-major and fixes R up front so nothing waits on
  an accelerator: N*k when it is known, a static bound N*cap for small accelerator steps (spare rows reuse a
  chosen expert and are never combined), else the true count.
- count groups (`count_groups_torch`): for fused-MoE kernels that take a fixed number of experts per token (vLLM's
  CPU kernel: a call with one expert per row runs ~18% slower per row than one with 8, see
  evals/results/vllm_bench_cpu.json): tokens grouped by how many experts they chose, one kernel call per group
  with that many slots, neighbouring counts merged where a call costs more than padding the smaller counts
  (padding repeats the token's first expert at weight 0 and is counted as a row).

This module is the torch reference and imports no kernels: engines call seqtopk.kernels.paths (plan, combine,
count_groups, gather_rows, scatter_rows), which runs the compiled CPU op where seqtopk.kernels.backend chose it and
these functions elsewhere.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

# Accelerator steps with at most this many [token, slot] entries use the static bound N*cap.
SMALL_STEP_SLOTS = 4096


@dataclass
class PairPlan:
    token: torch.Tensor  # [R] token of each row
    expert: torch.Tensor  # [R] expert of each row (spare rows: a chosen expert, never combined)
    slot_row: torch.Tensor  # [N, cap] row holding each (token, slot), -1 for unchosen slots
    slot_weight: torch.Tensor  # [N, cap] combine weight of each (token, slot), 0 for unchosen
    expert_end: torch.Tensor | None = None  # [E] int32 when rows are sorted by expert: end of each expert's rows

    @property
    def tokens(self) -> int:
        return self.slot_row.shape[0]

    @property
    def rows(self) -> int:
        return self.token.shape[0]

    def by_expert(self, num_experts: int) -> "PairPlan":
        """The same plan with rows sorted by expert, and each expert's end offset."""
        if self.expert_end is not None:
            return self
        expert, order = torch.sort(self.expert, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        if order.numel():
            slot_row = torch.where(self.slot_row >= 0, inverse[self.slot_row.clamp(min=0)], -1)
        else:  # no rows (a budget below one expert per token can choose none): nothing to look up
            slot_row = self.slot_row
        # histc, not bincount: no host sync and a static output size (as transformers does)
        counts_input = expert.float() if expert.device.type in ("cpu", "mps") else expert.int()
        per_expert = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1)
        return PairPlan(token=self.token[order], expert=expert, slot_row=slot_row, slot_weight=self.slot_weight,
                        expert_end=torch.cumsum(per_expert, dim=0, dtype=torch.int32))


def row_count(mask: torch.Tensor, exact_total: int | None) -> int:
    """R for a [N, cap] mask: the known exact total; on an accelerator, the static bound for small steps;
    else the true count (a host sync, free on the CPU, where spare rows would cost real compute)."""
    if exact_total is not None:
        return exact_total
    if mask.device.type != "cpu" and mask.numel() <= SMALL_STEP_SLOTS:
        return mask.numel()
    return int(mask.sum())


def plan_pairs(ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, rows: int) -> PairPlan:
    """List the chosen slots of ids/weights [N, cap] as `rows` rows (token-major, spare rows last). Torch
    reference of the compiled plan (which sorts rows by expert)."""
    tokens, cap = ids.shape
    flat_mask = mask.reshape(-1)
    position = torch.cumsum(flat_mask, dim=0) - 1  # row of each chosen slot
    # Chosen slots land in their row; unchosen ones in a spill row `rows` that is cut off.
    target = torch.where(flat_mask, position, torch.full_like(position, rows))
    slot_index = torch.zeros(rows + 1, dtype=torch.long, device=ids.device)
    slot_index.scatter_(0, target, torch.arange(flat_mask.numel(), device=ids.device))
    slot_index = slot_index[:rows]
    real = torch.arange(rows, device=ids.device) < flat_mask.sum()
    expert = ids.reshape(-1)[slot_index]
    # Spare rows take the first chosen pair's expert; only when nothing was chosen at all is that slot an
    # unchosen one (-1 under the "drop" convention), and then expert 0 stands in (never combined either way).
    expert = torch.where(real, expert, expert[:1]).clamp(min=0)
    slot_row = torch.where(flat_mask, position, torch.full_like(position, -1)).view(tokens, cap)
    return PairPlan(token=slot_index // cap, expert=expert, slot_row=slot_row,
                    slot_weight=weights.float().masked_fill(~mask, 0.0))


def differentiable(*tensors: torch.Tensor) -> bool:
    """Whether autograd follows these tensors (the compiled ops have no backward: training takes torch ops)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def combine_torch(rows: torch.Tensor, plan: PairPlan) -> torch.Tensor:
    """Sum per token of unweighted expert output rows [R, H] (in plan order), weighted: [N, H] in rows' dtype,
    accumulated in float32."""
    if rows.shape[0] == 0:  # nothing chosen in this forward (a budget below one expert per token)
        return rows.new_zeros(plan.tokens, rows.shape[-1])
    # One gather (unchosen slots read row 0 with weight 0), then one batched [1 x cap] @ [cap x H] per token.
    gathered = rows.index_select(0, plan.slot_row.clamp(min=0).reshape(-1)).view(plan.tokens, -1, rows.shape[-1])
    weights = plan.slot_weight.to(torch.float32).unsqueeze(1)
    return torch.bmm(weights, gathered.float()).squeeze(1).to(rows.dtype)


# Relative cost of a row in a call of vLLM's CPU fused-MoE kernel with c slots per token (index c - 1; the last
# entry serves larger c), measured on 2 cores (evals/results/vllm_bench_cpu.json, "kernel_slot_cost").
SLOT_COST = (1.18, 1.03, 1.0)


def count_groups_torch(ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_experts: int,
                       call_rows: float, reload_rows: float = 4.0, slot_cost=SLOT_COST) -> list[tuple]:
    """Tokens grouped by their number of chosen experts: [(tokens [n] int64, ids [n, c] int32, weights [n, c]
    float32)], each group one call of a fixed-width fused-MoE kernel. A group of counts (lo, hi] is padded to hi
    slots (a token's first chosen expert again, weight 0). Groups are merged where the estimated cost, in rows,
    is lower: call_rows per call, reload_rows per expert whose weights the call reads (the E * (1 - (1 - 1/E)^rows)
    experts its rows are expected to touch; every call reads them again), and rows * slot_cost[c - 1]. Tokens
    that chose nothing are in no group. The compiled count_groups makes the same groups, in the same order."""
    cap = ids.shape[1]
    counts = mask.sum(dim=-1)
    per_count = torch.bincount(counts, minlength=cap + 1).tolist()

    def cost(lo: int, hi: int) -> float:
        n = sum(per_count[lo + 1:hi + 1])
        if n == 0:
            return 0.0
        rows = n * hi
        touched = num_experts * (1.0 - math.pow(1.0 - 1.0 / num_experts, rows))
        return call_rows + reload_rows * touched + rows * slot_cost[min(hi, len(slot_cost)) - 1]

    best, cut = [0.0] + [float("inf")] * cap, [0] * (cap + 1)
    for j in range(1, cap + 1):
        for i in range(j):
            c = best[i] + cost(i, j)
            if c < best[j]:
                best[j], cut[j] = c, i
    ranges, j = [], cap
    while j > 0:
        ranges.append((cut[j], j))
        j = cut[j]
    # chosen slots first, in slot order: a stable sort of the slots by "unchosen"
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
    packed_ids = ids.gather(1, order).to(torch.int32)
    packed_weights = weights.float().gather(1, order)
    groups = []
    for lo, hi in reversed(ranges):
        members = torch.nonzero((counts > lo) & (counts <= hi)).squeeze(1)
        if members.numel() == 0:
            continue
        slot = torch.arange(hi, device=ids.device)
        chosen = slot.unsqueeze(0) < counts[members].unsqueeze(1)
        group_ids = torch.where(chosen, packed_ids[members, :hi], packed_ids[members, :1])
        group_weights = torch.where(chosen, packed_weights[members, :hi], 0.0)
        groups.append((members, group_ids, group_weights))
    return groups
