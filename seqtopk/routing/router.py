"""A routing call in torch: candidates -> each token's rule -> weights -> packed ids (the reference).

Engine adapters (through seqtopk.kernels.paths.route, which runs this or a kernel that decides the same) hand
over router logits of N flattened tokens, the family's scoring object, the layer's settings, the per-token rules
(seqtopk.routing.rules.TokenRules) and where the tokens sit in their sequences (a layout: `DenseLayout` for
[B, T] batches with padding, as transformers runs them; seqtopk.routing.ragged.RaggedBatch for packed serving
steps). They get back ids and weights in the fixed-width [N, C] form MoE kernels take, with unchosen slots
written by the engine's convention; the routing history (a seqtopk.routing.paged.PagedHistory) and the
statistics (`RouteStats`) are updated in the same call.

This module is the torch reference and imports no kernels; where a call runs (compiled CPU op, Triton, torch)
is decided in seqtopk.kernels.backend and carried out in seqtopk.kernels.paths. All make the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqtopk.config import ResolvedConfig
from seqtopk.routing.paged import PagedHistory
from seqtopk.routing.ragged import RaggedBatch, select_ragged
from seqtopk.routing.rules import TokenRules, choose, pack


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


def route_torch(logits: torch.Tensor, scoring, cfg: ResolvedConfig, layout: DenseLayout | RaggedBatch | None,
                rules: TokenRules, history: PagedHistory | None = None, unchosen: str = "drop",
                stats: RouteStats | None = None, record: bool = True, fused=None, cand=None) -> Routed:
    """Route the N tokens of one layer with torch ops: the reference every kernel path is compared with (engines
    call seqtopk.kernels.paths.route, which runs this or a kernel). layout None: the N tokens are one sequence,
    all real.

    history: the layer's routing history for the causal rule; this step's capped scores are recorded in it at
    its layout's write slots. record=False: neither the history nor the statistics are written (a second,
    identical routing of the same tokens, e.g. gradient-checkpointing recomputation). fused: the Triton steps
    (seqtopk.kernels.backend.TritonSteps) the rules may hand the sequence cut and one-token steps to. cand: the
    scoring's candidates of these logits when the caller has them already.
    """
    layout = as_layout(logits, layout)
    cand = cand if cand is not None else scoring.candidates(logits, cfg.cap)
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


def as_layout(logits: torch.Tensor, layout: DenseLayout | RaggedBatch | None) -> DenseLayout | RaggedBatch:
    """The layout of a routing call, checked against its N tokens (None: one sequence, all real)."""
    if layout is None:
        return DenseLayout(1, logits.shape[0])
    if isinstance(layout, DenseLayout) and logits.shape[0] != layout.batch * layout.tokens:
        raise ValueError(f"router got {logits.shape[0]} tokens, expected {layout.batch}x{layout.tokens}")
    return layout


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
