"""Routing statistics: how many experts each token received, per layer, in one schema for both engines.

Counters stay on the model's device and are updated without host syncs; numbers are read only when asked.
transformers (RoutingStats below) keeps a histogram per layer; vLLM (seqtopk/engines/vllm/stats.py) keeps
prompt and generated tokens apart and counts the expert rows its kernels ran. Both report a
RoutingStatsSnapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingStatsSnapshot:
    """Accumulated routing statistics. Lists are indexed like `layers`."""

    layers: list[str]
    k: list[float]
    tokens: list[int]  # real (non-padding) tokens routed
    assignments: list[int]  # (token, expert) pairs chosen
    histogram: list[list[int]] | None = None  # histogram[l][j]: tokens that received j experts in layer l
    # per phase ("prompt", "generated"): (tokens, pairs) per layer, where the engine tells them apart (vLLM)
    phases: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    expert_rows: list[int] | None = None  # (token, expert) rows the experts computed, where counted (vLLM)

    @property
    def experts_per_token(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.assignments, self.tokens)]

    @property
    def mean_experts_per_token(self) -> float:
        tokens = sum(self.tokens)
        return sum(self.assignments) / tokens if tokens else 0.0

    def phase_experts_per_token(self, phase: str) -> list[float | None]:
        """Experts per token of one phase, per layer (None before any token of it)."""
        tokens, pairs = self.phases[phase]
        return [p / t if t else None for p, t in zip(pairs, tokens)]

    def as_dict(self) -> dict:
        """Plain values (JSON, RPC). With phases: `<phase>` experts per token and `<phase>_tokens` (the layer
        furthest along: a snapshot taken in the middle of a step sees later layers behind); with expert rows:
        `expert_rows` per routed token."""
        out = {"layers": self.layers, "k": self.k, "tokens": self.tokens, "assignments": self.assignments,
               "histogram": self.histogram, "experts_per_token": self.experts_per_token}
        for phase, (tokens, _) in self.phases.items():
            out[phase] = self.phase_experts_per_token(phase)
            out[f"{phase}_tokens"] = max(tokens, default=0)
        if self.expert_rows is not None:
            out["expert_rows"] = [r / t if t else None for r, t in zip(self.expert_rows, self.tokens)]
        return out

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'k':>3} {'tokens':>8} {'experts/token':>14}  histogram (0,1,2,... experts)"]
        for i, name in enumerate(self.layers):
            lines.append(f"{name:<28} {self.k[i]:>3} {self.tokens[i]:>8} {self.experts_per_token[i]:>14.3f}  "
                         f"{self.histogram[i] if self.histogram is not None else ''}")
        lines.append(f"{'all layers':<28} {'':>3} {sum(self.tokens):>8} {self.mean_experts_per_token:>14.3f}")
        return "\n".join(lines)


@dataclass
class TraceRecord:
    """One forward: chosen expert ids [layers, B, T, cap] (-1 = unchosen), which tokens were real [B, T], and
    what the rule saw and chose: the capped scores [layers, B, T, cap] (best first) and the chosen slots
    [layers, B, T, cap]. With these a check applies the reference rule to the scores the model itself computed
    (tests/hf/test_families.py), whatever its numerics."""

    ids: torch.Tensor
    valid: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    @property
    def experts_per_token(self) -> torch.Tensor:
        return (self.ids >= 0).sum(dim=-1)  # [layers, B, T]


@dataclass
class RoutingTrace:
    forwards: list[TraceRecord] = field(default_factory=list)

    def experts_per_token(self) -> torch.Tensor:
        """[layers, B, total tokens] over all recorded forwards (they must share a batch size)."""
        return torch.cat([r.experts_per_token for r in self.forwards], dim=2)


class RoutingStats:
    """Per-layer counters for one patched model."""

    def __init__(self, layers: list[str], ks: list[int], caps: list[int]):
        self.layers = list(layers)
        self.ks = list(ks)
        self._width = max(caps) + 1
        self._trace: RoutingTrace | None = None
        self._pending: dict[int, tuple[torch.Tensor, ...]] = {}
        self._histogram: torch.Tensor | None = None  # [layers, width + 1]: tokens per expert count, + padding

    def reset(self) -> None:
        self._histogram = None

    def trace(self, layer: int, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep this forward's routing of a layer for the trace, while tracing: chosen ids ([B, T, cap], -1
        unchosen), capped scores and chosen slots (same shape). (The histogram is added to by the routing call
        itself: seqtopk.routing.router.RouteStats.)"""
        if self._trace is not None:
            self._pending[layer] = (ids.detach(), values.detach().float(), mask.detach())

    @property
    def tracing(self) -> bool:
        return self._trace is not None

    def histogram_row(self, layer: int, device) -> torch.Tensor:
        """This layer's histogram row (bins 0..width-1 experts, then the padding spill bin), which routing calls
        add to in place (no host sync); tokens and assignments are read off it when asked."""
        if self._histogram is None or self._histogram.device != torch.device(device):
            self._histogram = torch.zeros(len(self.layers), self._width + 1, dtype=torch.long, device=device)
        return self._histogram[layer]

    def end_forward(self, valid: torch.Tensor, completed: bool = True) -> None:
        """Called once per model forward: closes the trace record of that forward. A forward that raised
        (completed=False) routed only some layers, so its partial record is dropped, never traced; its counts
        stay, since those tokens were routed."""
        if not completed:
            self._pending = {}
        if self._trace is None or not self._pending:
            return
        ids, values, mask = (torch.stack(parts).cpu() for parts in zip(*(self._pending[i] for i in sorted(self._pending))))
        self._trace.forwards.append(TraceRecord(ids=ids, valid=valid.detach().cpu(), values=values, mask=mask))
        self._pending = {}

    def start_trace(self) -> RoutingTrace:
        self._trace = RoutingTrace()
        self._pending = {}
        return self._trace

    def stop_trace(self) -> None:
        self._trace = None
        self._pending = {}

    def snapshot(self) -> RoutingStatsSnapshot:
        width = self._width
        if self._histogram is None:
            histogram = [[0] * width for _ in self.layers]
        else:
            histogram = [row[:width] for row in self._histogram.cpu().tolist()]
        return RoutingStatsSnapshot(
            layers=self.layers,
            k=self.ks,
            tokens=[sum(row) for row in histogram],
            assignments=[sum(j * n for j, n in enumerate(row)) for row in histogram],
            histogram=histogram,
        )
