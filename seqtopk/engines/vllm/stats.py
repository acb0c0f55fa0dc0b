"""Routing statistics of a running vLLM engine: experts per token, per layer, prompt and generated tokens.

Counters stay on the device and are added to without reading them back, by the code that does the work: the
routing call adds the tokens and pairs it chose (seqtopk.routing.router.RouteStats); the MoE op counts the
expert rows it ran (seqtopk.engines.vllm.router.SeqTopKRouter.forward) as a host int, or on the device in a
CUDA graph. They are read (one sync) only when a
log line is due, every SEQTOPK_LOG_INTERVAL seconds (default 10; 0 turns the lines off), or when a client
asks through the worker extension (`collective_rpc("seqtopk_stats")`). A trace of the chosen ids
per token can be switched on for checks (`seqtopk_trace`); it reads every step back and is for tests. Steps
replayed from CUDA graphs add to the counters on the device but run no Python: they write no trace records
and no log lines (the next eager step, or a client's request, reports them).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from seqtopk.engines.vllm.registry import WORKER
from seqtopk.routing.rules import pack
from seqtopk.routing.stats import RoutingStatsSnapshot

logger = logging.getLogger("vllm.seqtopk")  # under "vllm" so it shares vLLM's log handlers

_last_log = [time.monotonic()]  # when the last log line was written (per process)


def interval() -> float:
    return float(os.environ.get("SEQTOPK_LOG_INTERVAL", "10"))


COUNTERS = ("prompt_tokens", "prompt_pairs", "generated_tokens", "generated_pairs", "expert_rows")


def after_step(router, step, routed, graph: bool = False) -> None:
    """Host work after a layer's step: its trace record while a client traces, and the periodic log line.
    routed: the layer's routing (seqtopk.routing.router.Routed). graph: the step is being captured in a CUDA
    graph, whose replays repeat its device work but none of this."""
    if graph:
        return
    if WORKER.trace is not None:
        real = step.batch.real
        # Plain lists: the records travel back to the client through collective_rpc. `layer` numbers this
        # process's routers; `layer_name` is the model's (a pipeline stage numbers only its own layers).
        # `values` (the capped scores the engine computed, best first) and `mask` (the slots chosen) let a
        # client apply the torch rule to the engine's own scores (rule-level verification).
        WORKER.trace.append(dict(layer=router.index, layer_name=router.layer_name, req_ids=step.req_ids,
                                 row=step.batch.row[real].tolist(), position=step.batch.positions()[real].tolist(),
                                 ids=pack(routed.ids, routed.mask, "drop")[real].tolist(),
                                 values=routed.values[real].float().tolist(), mask=routed.mask[real].tolist(),
                                 unchosen_weight=float(routed.weights[real].masked_fill(routed.mask[real], 0).abs().sum()),
                                 state_rows=state_rows_in_use(), kernel=_kernel_pairs(routed, real)))
    if router is WORKER.first_router() and interval() > 0 and time.monotonic() - _last_log[0] >= interval():
        _last_log[0] = time.monotonic()
        log_line()


def _kernel_pairs(routed, real) -> list | None:
    """Per real token, the (expert, weight) pairs the experts kernel was given, when the compiled layer recorded
    them (`kernel`: rows as token, expert, weight); None otherwise."""
    kernel = getattr(routed, "kernel", None)
    if kernel is None:
        return None
    token, expert, weight = kernel
    pairs = [[] for _ in range(real.shape[0])]
    for t, e, w in zip(token.tolist(), expert.tolist(), weight.tolist()):
        pairs[t].append([e, w])
    return [pairs[t] for t in torch.nonzero(real).squeeze(1).tolist()]


def routing_snapshot() -> RoutingStatsSnapshot:
    """This process's counters in the schema both engines report (seqtopk.routing.stats)."""
    routers = list(WORKER.routers.values())
    counts = []
    for router in routers:
        row = router.counts.tolist() if router.counts is not None else [0] * len(COUNTERS)
        row[4] += router.host_rows
        counts.append(row)
    return RoutingStatsSnapshot(
        layers=[router.layer_name for router in routers], k=[router.cfg.k for router in routers],
        tokens=[c[0] + c[2] for c in counts], assignments=[c[1] + c[3] for c in counts],
        phases={"prompt": ([c[0] for c in counts], [c[1] for c in counts]),
                "generated": ([c[2] for c in counts], [c[3] for c in counts])},
        expert_rows=[c[4] for c in counts])  # padding tokens' rows included, next to the chosen experts


def snapshot() -> dict:
    """The routing snapshot as plain values (experts per token per layer and phase, None before any token;
    expert rows computed per token; token counts), with the routing-state memory and the state rows running
    requests hold."""
    out = {**routing_snapshot().as_dict(), **WORKER.memory}
    out.setdefault("prompt_tokens", 0)
    out.setdefault("generated_tokens", 0)
    out["state_rows_in_use"] = state_rows_in_use()
    out["layer_paths"] = layer_paths()
    return out


def layer_paths() -> list[str]:
    """What runs this worker's SeqTopK layers: "compiled layer op" (seqtopk_cpu::moe_layer), or "python op" with
    the routing backend it calls (seqtopk.kernels.backend), so a run can show which path it measured."""
    from seqtopk.kernels.backend import backend_for

    paths = set()
    for router in WORKER.routers.values():
        if router.whole_layer:
            paths.add("compiled layer op")
        else:
            device = router.store.device if router.store is not None else torch.device("cpu")
            paths.add(f"python op ({backend_for(device)})")
    return sorted(paths)


def state_rows_in_use() -> int:
    """Rows of each layer's routing store that running requests hold: the KV slots of their blocks (a
    request's state is released with its blocks, so this is 0 whenever no request runs)."""
    source = WORKER.source
    runner = source.runner() if source.runner is not None else None
    if runner is None or source.group is None:
        return 0
    batch = runner.input_batch
    table = batch.block_table[source.group]
    return int(table.num_blocks_per_row[: batch.num_reqs].sum()) * table.block_size


def _mean(values):
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.2f}" if values else "-"


def log_line() -> None:
    stats = snapshot()
    if not stats["layers"]:
        return
    per_layer = " ".join(f"{_mean([p])}/{_mean([g])}" for p, g in zip(stats["prompt"], stats["generated"]))
    logger.info("SeqTopK routing: experts/token prompt %s over %d tokens, generated %s over %d tokens; "
                "per layer (prompt/generated): %s", _mean(stats["prompt"]), stats["prompt_tokens"],
                _mean(stats["generated"]), stats["generated_tokens"], per_layer)


BAND_COUNTERS = ("band_builds", "band_answers", "history_walks")
_band_totals = [0] * len(BAND_COUNTERS)  # this process's, since it started (the kernel's counters reset on read)


def band_counters() -> dict | None:
    """How the compiled CPU kernel reached this process's decode decisions so far: band builds from the store
    (the first one of each decode run, and a rebuild whenever the band went stale or the streaming cut left it),
    candidates a band answered, and candidates counted by a walk of the history. None without the kernels (the
    torch path keeps no bands)."""
    from seqtopk.kernels import compiled, ops

    if not compiled.load():
        return None
    for i, value in enumerate(ops.band_counters()):
        _band_totals[i] += int(value)
    return dict(zip(BAND_COUNTERS, _band_totals))


def start_trace() -> None:
    WORKER.trace = []
    _whole_layer_trace(True)


def stop_trace() -> list:
    records, WORKER.trace = WORKER.trace or [], None
    _whole_layer_trace(False)
    return records


def _whole_layer_trace(on: bool) -> None:
    """Compiled layers (seqtopk_cpu::moe_layer) keep their last routing and kernel rows while a client traces."""
    if any(router.whole_layer_ready for router in WORKER.routers.values()):
        from seqtopk.kernels import ops

        ops.moe_trace(on)
