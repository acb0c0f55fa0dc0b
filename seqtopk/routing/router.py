"""The one routing call every engine makes: candidates -> each token's rule -> weights -> packed ids.

Engine adapters hand over router logits of N flattened tokens, the family's scoring object, the layer's
settings, the per-token rules (seqtopk.routing.rules.TokenRules) and where the tokens sit in their
sequences (a layout: `DenseLayout` for [B, T] batches with padding, as transformers runs them;
seqtopk.routing.ragged.RaggedBatch for packed serving steps). They get back ids and weights in the
fixed-width [N, C] form MoE kernels take, with unchosen slots written by the engine's convention; the routing
history (a seqtopk.routing.paged.PagedHistory) and the statistics (`RouteStats`) are updated in the same call.

Where the decisions are computed is decided by seqtopk.kernels.backend (one place for both engines): the
compiled CPU op applies every rule in one call; on CUDA the Triton kernels take the sequence cut and one-token
steps; otherwise the torch reference in seqtopk.routing.rules runs. All make the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqtopk.config import ResolvedConfig
from seqtopk.kernels import ops
from seqtopk.kernels.backend import CPU_KERNELS, TRITON, TRITON_STEPS, backend_for
from seqtopk.routing.dispatch import differentiable
from seqtopk.routing.paged import PagedHistory
from seqtopk.routing.ragged import RaggedBatch, select_ragged
from seqtopk.routing.rules import CAUSAL, UNCHOSEN, TokenRules, budget_split, choose, pack
from seqtopk.routing.scoring import SoftmaxScoring


@dataclass
class DenseLayout:
    """B sequences of T tokens, flattened sequence-major (token t of sequence b is row b*T + t)."""

    batch: int
    tokens: int
    valid: torch.Tensor | None = None  # [B, T] real tokens (None: all)
    seen: torch.Tensor | None = None  # [B] real tokens of each sequence before these (streaming rule)
    _kernel: dict = field(default_factory=dict, repr=False)

    def choose(self, values: torch.Tensor, rules: TokenRules, cfg: ResolvedConfig,
               history: torch.Tensor | PagedHistory | None, fused=None) -> torch.Tensor:
        shape = (self.batch, self.tokens)
        dense_rules = rules.laid_out(lambda codes: codes.view(shape))
        mask = choose(values.view(*shape, -1), self.valid, dense_rules, cfg, history, self.seen, fused=fused)
        return mask.view(values.shape)

    def real_tokens(self) -> torch.Tensor | None:
        """[N] real tokens (None: all)."""
        return None if self.valid is None else self.valid.reshape(-1)

    def kernel_rows(self, device) -> dict:
        """Rows as the compiled kernel takes them, built once per layout."""
        if not self._kernel:
            self._kernel.update(
                row_start=torch.arange(self.batch + 1, dtype=torch.long, device=device) * self.tokens,
                token_valid=None if self.valid is None else self.valid.reshape(-1).contiguous(),
                row_seen=(self.seen.long().contiguous() if self.seen is not None
                          else torch.zeros(self.batch, dtype=torch.long, device=device)))
        return self._kernel

    def kernel_rules(self, rules: TokenRules) -> TokenRules:
        return rules


@dataclass
class Routed:
    values: torch.Tensor  # [N, C] capped scores the tokens competed with (what a routing history keeps)
    mask: torch.Tensor  # [N, C] chosen slots
    ids: torch.Tensor  # [N, C] expert ids, unchosen slots by the engine's convention (rules.pack)
    weights: torch.Tensor  # [N, C] combine weights, 0 in unchosen slots


@dataclass
class RouteStats:
    """Where a routing call adds its statistics (device tensors, updated in place, never read back here).

    histogram: [width + 1] int64, tokens per number of experts taken, padding tokens in the last bin;
    token_class: [N] int8 (1, 2: two classes of tokens, e.g. prompt and generated; 0: neither) with
    counters: [>= 4] int64, tokens and pairs of class 1, then of class 2.
    """

    histogram: torch.Tensor | None = None
    token_class: torch.Tensor | None = None
    counters: torch.Tensor | None = None


def route(logits: torch.Tensor, scoring, cfg: ResolvedConfig, layout: DenseLayout | RaggedBatch | None,
          rules: TokenRules, history: PagedHistory | None = None, unchosen: str = "drop",
          stats: RouteStats | None = None, record: bool = True) -> Routed:
    """Route the N tokens of one layer. layout None: the N tokens are one sequence, all real.

    history: the layer's routing history for the causal rule; this step's capped scores are recorded in it at
    its layout's write slots. record=False: neither the history nor the statistics are written (a second,
    identical routing of the same tokens, e.g. gradient-checkpointing recomputation).
    """
    if layout is None:
        layout = DenseLayout(1, logits.shape[0])
    if isinstance(layout, DenseLayout) and logits.shape[0] != layout.batch * layout.tokens:
        raise ValueError(f"router got {logits.shape[0]} tokens, expected {layout.batch}x{layout.tokens}")
    path = backend_for(logits.device)
    if path == TRITON:
        fused = _triton_decode_step(logits, scoring, cfg, layout, rules, history, unchosen, stats, record)
        if fused is not None:
            return fused
    cand = scoring.candidates(logits, cfg.cap)
    if path == CPU_KERNELS and cand.values.dtype == torch.float32:
        # The op also weighs softmax-scored layers (except at cap == k, where the family's own TopK weights must
        # come out bit for bit, and in training, where the weights' gradient must reach the router) and packs the ids.
        weighs = cfg.cap > cfg.k and type(scoring) is SoftmaxScoring and not differentiable(logits)
        mode = getattr(scoring, "kernel_weights", 0) if weighs else 0
        mask, weights, ids = _kernel_choose(cand.values.detach(), layout, rules, cfg, history, stats if record else None,
                                            record, cand.ids, unchosen, mode)
        if not mode:
            weights = scoring.weights(logits, cand, mask)
        return Routed(values=cand.values, mask=mask, ids=ids, weights=weights)
    else:
        fused = TRITON_STEPS if path == TRITON else None
        if isinstance(layout, RaggedBatch):
            mask = select_ragged(cand.values, layout, rules, cfg, history, fused=fused)
        else:
            mask = layout.choose(cand.values, rules, cfg, history, fused=fused)
        real = layout.real_tokens()
        if record and isinstance(history, PagedHistory):
            history.record(cand.values, real)
        if record and stats is not None:
            add_stats(stats, mask, real)
    weights = scoring.weights(logits, cand, mask)
    return Routed(values=cand.values, mask=mask, ids=pack(cand.ids, mask, unchosen), weights=weights)


def _kernel_choose(values, layout, rules: TokenRules, cfg: ResolvedConfig, history: PagedHistory | None,
                   stats: RouteStats | None, record: bool, ids: torch.Tensor, unchosen: str, weight_mode: int):
    """Every rule in one call of the compiled CPU op (seqtopk/kernels/cpu/route.cpp): (mask, weights or an
    empty tensor when weight_mode is 0, ids packed by the `unchosen` convention)."""
    rows = layout.kernel_rows(values.device)
    rules = layout.kernel_rules(rules)
    paged = history.layout.kernel_args() if history is not None else {}
    split = budget_split(cfg.k, cfg.cap, cfg.min_experts, cfg.exact_budget)
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


def add_stats(stats: RouteStats, mask: torch.Tensor, real: torch.Tensor | None) -> None:
    """The statistics of one routing call with torch ops (what the compiled op adds in its own pass)."""
    chosen = mask.sum(dim=-1)
    if stats.histogram is not None:
        spill = stats.histogram.numel() - 1
        bins = chosen.clamp(max=spill - 1) if real is None else torch.where(real, chosen.clamp(max=spill - 1), spill)
        stats.histogram.scatter_add_(0, bins, torch.ones_like(bins))
    if stats.token_class is not None and stats.counters is not None:
        classes = torch.stack([stats.token_class == 1, stats.token_class == 2]).long()  # [2, N]
        update = torch.stack([classes.sum(dim=1), (classes * chosen).sum(dim=1)], dim=1).view(4)
        stats.counters[:4] += update


def _triton_decode_step(logits, scoring, cfg, layout, rules, history, unchosen, stats, record) -> Routed | None:
    """A one-token step of a softmax-scored layer under the streaming rule, from paged history, in one Triton
    kernel (seqtopk/kernels/decode_step.py): the same decisions as the torch path, one launch instead of ~25
    small ops, and no host read (CUDA graphs). None when that does not apply."""
    from seqtopk.kernels import decode_step

    one_token = layout.max_query == 1 if isinstance(layout, RaggedBatch) else layout.tokens == 1
    seen = layout.context if isinstance(layout, RaggedBatch) else layout.seen
    real = layout.real_tokens()
    split = budget_split(cfg.k, cfg.cap, cfg.min_experts, cfg.exact_budget)
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
