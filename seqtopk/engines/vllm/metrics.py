"""SeqTopK's routing state and experts per token as Prometheus gauges on vLLM's /metrics.

The counters live in the worker process (seqtopk.engines.vllm.stats); /metrics is served by the API server
process. With SeqTopK on, the API server polls the workers every SEQTOPK_METRICS_INTERVAL seconds (default
5; 0 turns the gauges off) through the engine's collective RPC (`seqtopk_stats`, one device read) while
requests run, and once after they finish (or after requests finished between two polls), and sets:
- seqtopk_routing_state_rows: rows of paged routing state held by running requests (one per KV slot of
  their blocks; it returns to 0 when no request runs, so a leak shows as a floor that does not drop);
- seqtopk_routing_state_bytes: the same in bytes, over every MoE layer;
- seqtopk_experts_per_token{phase="prompt"|"generated"}: experts per token so far, mean over layers;
- seqtopk_expert_rows_per_token: (token, expert) rows the experts computed per token.
"""

from __future__ import annotations

import asyncio
import logging
import os

logger = logging.getLogger("vllm.seqtopk")  # under "vllm" so it shares vLLM's log handlers

ENTRY = "vllm.entrypoints.launchers.api_server.entry"  # where the API server builds its app state
_gauges: dict = {}


def interval() -> float:
    return float(os.environ.get("SEQTOPK_METRICS_INTERVAL", "5"))


def start_polling(original):
    """The API server's app-state set-up (`init_app_state`), starting the poller after it (installed by
    seqtopk.engines.vllm.hooks once a server's SeqTopK settings are validated)."""
    async def init_app_state(engine_client, state, args, *rest, **kwargs):
        await original(engine_client, state, args, *rest, **kwargs)
        if interval() > 0:
            state.seqtopk_metrics = asyncio.get_running_loop().create_task(poll(engine_client))

    return init_app_state


def gauges() -> dict:
    """The gauges, registered once per process in prometheus_client's default registry (vLLM's /metrics)."""
    if not _gauges:
        from prometheus_client import Gauge

        _gauges.update(
            state_rows=Gauge("seqtopk_routing_state_rows", "Rows of SeqTopK routing state held by running requests"),
            state_bytes=Gauge("seqtopk_routing_state_bytes", "Bytes of SeqTopK routing state held by running "
                              "requests, over all MoE layers"),
            experts=Gauge("seqtopk_experts_per_token", "Experts per token so far, mean over MoE layers", ["phase"]),
            rows=Gauge("seqtopk_expert_rows_per_token", "(token, expert) rows the experts computed per token"))
    return _gauges


def publish(stats: dict) -> None:
    """Set the gauges from one worker's seqtopk_stats snapshot."""
    g = gauges()
    g["state_rows"].set(stats.get("state_rows_in_use", 0))
    g["state_bytes"].set(stats.get("state_rows_in_use", 0) * stats.get("state_bytes_per_token", 0))
    for phase in ("prompt", "generated"):
        values = [v for v in stats.get(phase, []) if v is not None]
        g["experts"].labels(phase=phase).set(sum(values) / len(values) if values else 0.0)
    rows = [v for v in stats.get("expert_rows", []) if v is not None]
    g["rows"].set(sum(rows) / len(rows) if rows else 0.0)


def finished_requests() -> float | None:
    """Requests this server has finished so far, read from vLLM's own `vllm:request_success` counter (same
    process, same registry); None when vLLM keeps no statistics (--disable-log-stats)."""
    from prometheus_client import REGISTRY

    total, found = 0.0, False
    for metric in REGISTRY.collect():
        if metric.name == "vllm:request_success":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    total, found = total + sample.value, True
    return total if found else None


async def poll(engine_client) -> None:
    """Refresh the gauges until the server stops; a failed read is logged and retried, never raised.

    Reads while requests run, and once more when they have all finished (the state rows then read 0), or when
    requests finished since the last read (one shorter than the interval is never seen running): each read
    wakes the worker, whose message queue then spins a CPU core for a second, so an idle server is left alone."""
    settled, done = False, None
    while True:
        await asyncio.sleep(interval())
        busy = engine_client.get_num_unfinished_requests() > 0
        finished = None if busy else finished_requests()  # a busy server is read anyway: no registry walk then
        if settled and not busy and finished == done:
            continue
        try:
            replies = await engine_client.collective_rpc("seqtopk_stats", timeout=30)
            publish(replies[0])
            settled, done = not busy, finished
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the server must keep serving whatever the read does
            logger.warning("SeqTopK metrics: could not read the routing statistics (%s)", err)
