"""The routing and dispatch calls engines make, each run on the path chosen for its tensors' device.

seqtopk.kernels.backend decides the path (the compiled CPU ops, the Triton kernels, or the torch reference);
this module carries the call out there: compiled ops through seqtopk.kernels.ops, Triton kernels, or the torch
reference in seqtopk.routing (router.route_torch, dispatch.*_torch), which makes the same decisions. A layer
asks `backend_for` once per call and hands the answer (`path=`) to each of these; a call without one asks
itself. Every function here falls back to the torch reference where the chosen path cannot serve the tensors
(dtype, autograd, shapes).
"""

from __future__ import annotations

import torch

from seqtopk.config import ResolvedConfig
from seqtopk.kernels import compiled, ops
from seqtopk.kernels.backend import CPU_KERNELS, TRITON, TRITON_STEPS, backend_for
from seqtopk.routing import dispatch
from seqtopk.routing.dispatch import SLOT_COST, PairPlan, differentiable
from seqtopk.routing.paged import PagedHistory, mark_stale
from seqtopk.routing.ragged import RaggedBatch
from seqtopk.routing.router import DenseLayout, Routed, RouteStats, add_stats, as_layout, route_torch
from seqtopk.routing.rules import CAUSAL, UNCHOSEN, TokenRules, capped_candidates, pack
from seqtopk.routing.scoring import SoftmaxScoring


def route(logits: torch.Tensor, scoring, cfg: ResolvedConfig, layout: DenseLayout | RaggedBatch | None,
          rules: TokenRules, history: PagedHistory | None = None, unchosen: str = "drop",
          stats: RouteStats | None = None, record: bool = True, path: str | None = None) -> Routed:
    """Route the N tokens of one layer (arguments as seqtopk.routing.router.route_torch) on `path`: the compiled
    CPU op applies every rule, the history write and the statistics in one call; on CUDA one Triton kernel takes
    a one-token streaming step, and Triton takes the sequence cut and the causal steps inside the torch rules;
    elsewhere the torch reference runs."""
    path = path or backend_for(logits.device)
    layout = as_layout(logits, layout)
    if path == TRITON:
        fused = _triton_decode_step(logits, scoring, cfg, layout, rules, history, unchosen, stats, record)
        if fused is not None:
            return fused
        return route_torch(logits, scoring, cfg, layout, rules, history, unchosen, stats, record, fused=TRITON_STEPS)
    if path != CPU_KERNELS:
        return route_torch(logits, scoring, cfg, layout, rules, history, unchosen, stats, record)
    cand = scoring.candidates(logits, cfg.cap, top=compiled_candidates)
    if cand.values.dtype != torch.float32:  # (the op takes float32 scores)
        return route_torch(logits, scoring, cfg, layout, rules, history, unchosen, stats, record, cand=cand)
    # The op also weighs softmax-scored layers (except at cap == k, where the family's own TopK weights must come
    # out bit for bit, and in training, where the weights' gradient must reach the router) and packs the ids.
    weighs = cfg.cap > cfg.k and type(scoring) is SoftmaxScoring and not differentiable(logits)
    mode = getattr(scoring, "kernel_weights", 0) if weighs else 0
    mask, weights, ids = _kernel_choose(cand.values.detach(), layout, rules, cfg, history, stats if record else None,
                                        record, cand.ids, unchosen, mode)
    if not mode:
        weights = scoring.weights(logits, cand, mask)
    return Routed(values=cand.values, mask=mask, ids=ids, weights=weights)


def compiled_candidates(scores: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rules.capped_candidates by the compiled op where it takes the scores (2-D float32 on the CPU, no gradient
    to carry), else by the torch reference: the same order either way."""
    if scores.dim() == 2 and scores.dtype == torch.float32 and scores.device.type == "cpu" and not differentiable(scores):
        return ops.capped_candidates(scores, cap)
    return capped_candidates(scores, cap)


def _kernel_choose(values, layout, rules: TokenRules, cfg: ResolvedConfig, history: PagedHistory | None,
                   stats: RouteStats | None, record: bool, ids: torch.Tensor, unchosen: str, weight_mode: int):
    """Every rule in one call of the compiled CPU op (seqtopk/kernels/cpu/route.cpp): (mask, weights or an
    empty tensor when weight_mode is 0, ids packed by the `unchosen` convention)."""
    rows = layout.kernel_rows(values.device)
    rules = layout.kernel_rules(rules)
    paged = history.layout.kernel_args() if history is not None else {}
    split = cfg.split
    stats = stats or RouteStats()
    return ops.route_step(
        values.contiguous(), rows["row_start"], rows["token_valid"],
        None if rules.codes is None else rules.codes.reshape(-1).to(torch.int8).contiguous(),
        rules.code() if rules.codes is None else -1, rows["row_seen"],
        store=history.store if history is not None else None, block_table=paged.get("block_table"),
        block_size=paged.get("block_size", 1), row_length=paged.get("row_length"),
        write_slots=paged.get("write_slots") if record else None,
        bands=history.bands if (history is not None and record) else None,
        row_band=paged.get("row_band") if record else None, forced=split.forced, first=split.first,
        per_token=split.per_token, scale=split.scale, k=int(cfg.k), histogram=stats.histogram,
        token_class=stats.token_class, class_counters=stats.counters, ids=ids.long(),
        unchosen=UNCHOSEN.index(unchosen), weight_mode=weight_mode)


def _triton_decode_step(logits, scoring, cfg, layout, rules, history, unchosen, stats, record) -> Routed | None:
    """A one-token step of a softmax-scored layer under the streaming rule, from paged history, in one Triton
    kernel (seqtopk/kernels/decode_step.py): the same decisions as the torch path, one launch instead of ~25
    small ops, and no host read (CUDA graphs). None when that does not apply."""
    from seqtopk.kernels import decode_step

    one_token = layout.max_query == 1 if isinstance(layout, RaggedBatch) else layout.tokens == 1
    seen = layout.context if isinstance(layout, RaggedBatch) else layout.seen
    real = layout.real_tokens()
    split = cfg.split
    if not (one_token and isinstance(history, PagedHistory) and type(scoring) is SoftmaxScoring and record
            and split.scale == 1
            and rules.single_tokens().present == (CAUSAL,) and seen is not None):
        return None
    tokens = logits.shape[0]
    if real is None:
        real = torch.ones(tokens, dtype=torch.bool, device=logits.device)
    paged = history.layout
    probs = torch.softmax(logits.float(), dim=-1)
    histogram = stats.histogram if stats is not None else None
    values, weights, ids, mask = decode_step.paged_decode(
        probs, history.store, paged.block_table, paged.block_size, paged.length, seen, real,
        split, cap=cfg.cap, from_probs=True,
        renormalize=scoring.renormalize, write_slots=paged.write_slots, stats_row=histogram)
    if stats is not None and stats.counters is not None:
        add_stats(RouteStats(token_class=stats.token_class, counters=stats.counters), mask, real)
    ids = ids.long()
    return Routed(values=values, mask=mask, ids=pack(ids, mask, unchosen), weights=weights)


# -- dispatch: the chosen pairs as rows, and back ---------------------------------------------------------------

def plan(ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_experts: int,
         exact_total: int | None = None, path: str | None = None) -> PairPlan:
    """The chosen slots of ids/weights/mask [N, cap] as rows of one expert each: sorted by expert by the
    compiled CPU op, else token-major (seqtopk.routing.dispatch.plan_pairs, with row_count's R)."""
    if (path or backend_for(ids.device)) == CPU_KERNELS:
        token, expert, expert_end, slot_row = ops.plan_rows(ids, mask, num_experts)
        return PairPlan(token=token, expert=expert, slot_row=slot_row,
                        slot_weight=weights.float().masked_fill(~mask, 0.0), expert_end=expert_end)
    return dispatch.plan_pairs(ids, weights, mask, dispatch.row_count(mask, exact_total))


def gather_rows(x: torch.Tensor, index: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """x[index] for [N, H] x and [R] index (row copies on the CPU with the compiled kernels)."""
    if (path or backend_for(x.device)) == CPU_KERNELS and x.dim() == 2 and not differentiable(x):
        return ops.gather_rows(x, index)
    return x.index_select(0, index)


def scatter_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, path: str | None = None) -> None:
    """out[index] = rows, in place ([N, H] out, [R] index, [R, H] rows)."""
    if (path or backend_for(out.device)) == CPU_KERNELS and out.is_contiguous() and not differentiable(rows):
        ops.scatter_rows(out, index, rows)
    else:
        out.index_copy_(0, index, rows)


def combine(rows: torch.Tensor, plan: PairPlan, path: str | None = None) -> torch.Tensor:
    """Sum per token of unweighted expert output rows [R, H] (in plan order), weighted: [N, H] in rows' dtype,
    accumulated in float32."""
    if ((path or backend_for(rows.device)) == CPU_KERNELS
            and rows.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not differentiable(rows, plan.slot_weight)):
        return ops.combine_rows(rows, plan.slot_row, plan.slot_weight)
    return dispatch.combine_torch(rows, plan)


def count_groups(ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_experts: int,
                 call_rows: float, reload_rows: float = 4.0, slot_cost=SLOT_COST, path: str | None = None) -> list:
    """Tokens grouped by their number of chosen experts, one fixed-width kernel call per group (what and why:
    seqtopk.routing.dispatch.count_groups_torch)."""
    if (path or backend_for(ids.device)) == CPU_KERNELS:
        return ops.count_groups(ids, weights, mask, num_experts, call_rows, reload_rows, slot_cost)
    return dispatch.count_groups_torch(ids, weights, mask, num_experts, call_rows, reload_rows, slot_cost)


def new_bands(rows: int, device=None) -> torch.Tensor:
    """`rows` decode bands for the compiled CPU kernel (seqtopk/kernels/cpu/history.h), all stale (built from the
    store on first use); 8-byte stubs where the kernels are not built (no path reads them)."""
    size = ops.band_bytes() if compiled.load() else 8
    bands = torch.zeros(rows, size, dtype=torch.uint8, device=device)
    mark_stale(bands)
    return bands
