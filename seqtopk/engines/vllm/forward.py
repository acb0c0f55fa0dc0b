"""Around each model forward of a vLLM worker: the batch rows refreshed before it, the step's layout handed to
the compiled layers once (not once per layer), and what the layers kept read back after it (installed by
seqtopk.engines.vllm.hooks, hooks 5 and 6).
"""

from __future__ import annotations

import torch

from seqtopk.engines.vllm.registry import WORKER
from seqtopk.kernels import ops


def around_forward(runner, forward, args, kwargs):
    """The runner's model forward, with the step handed to the compiled layers around it (another engine in this
    process that runs stock, or one without compiled layers, runs the forward untouched)."""
    if not whole_layers() or not serves_seqtopk(runner):
        return forward(runner, *args, **kwargs)
    step = set_whole_layer_step(runner, kwargs)
    try:
        return forward(runner, *args, **kwargs)
    finally:
        ops.moe_clear_step()  # a later forward without a step (warm-up) must not reuse this one
        after_whole_layer_step(step)


def serves_seqtopk(runner) -> bool:
    """Whether `runner` is the model runner SeqTopK's routing state is attached to."""
    source = WORKER.source
    return source.runner is not None and source.runner() is runner


_WHOLE_LAYERS: list = [None, []]  # (WORKER.generation, its routers that run as one compiled op)


def whole_layers() -> list:
    """This worker's routers that run as one compiled op (found again only when the routers or their state change:
    asked twice per forward)."""
    if _WHOLE_LAYERS[0] != WORKER.generation:
        _WHOLE_LAYERS[:] = [WORKER.generation, [router for router in WORKER.routers.values()
                                                 if router.whole_layer_ready and router.store is not None]]
    return _WHOLE_LAYERS[1]


def set_whole_layer_step(runner, forward_args: dict):
    """Hand the forward's layout to the compiled layers, once for all of them (inside vLLM's forward context), built
    in C++ from the runner's step buffers (step.hand_engine_step). Returns None, and hands nothing over, for a
    forward that routes no request; else the Python layout while a client traces (its records need it), True
    otherwise."""
    from seqtopk.engines.vllm.step import current_step, hand_engine_step

    positions, input_ids = forward_args.get("positions"), forward_args.get("input_ids")
    tokens = positions.shape[-1] if positions is not None else input_ids.shape[0]
    if not hand_engine_step(runner, tokens, whole_layers()[0].cfg):
        return None
    return current_step(tokens) if WORKER.trace is not None else True


def after_whole_layer_step(step) -> None:
    """What the Python op does after each layer (stats.after_step: trace records, the periodic log line), once
    per forward for the compiled layers, from the routing each kept (ops.moe_last) while a client traces.
    step: what set_whole_layer_step returned."""
    from seqtopk.engines.vllm import stats
    from seqtopk.routing.router import Routed

    if step is None:
        return
    if WORKER.trace is None:  # (the periodic log line only, as the first layer writes it)
        stats.after_step(WORKER.first_router(), step, None)
        return
    for router in whole_layers():
        last = ops.moe_last(router.index)
        if not last:
            continue
        values, mask, ids, weights, token, expert, weight = last
        routed = Routed(values=values, mask=mask, ids=ids, weights=weights)
        routed.kernel = (token, expert, weight)
        stats.after_step(router, step, routed)


SKIP_UNCHANGED = True  # (False: refresh every step; evals/bench_step_hooks.py times both in one engine)


def refresh_step_rows(runner, scheduler_output) -> None:
    """Before the forward: copy the batch rows' prompt lengths and decode bands into the device buffers the
    routing step reads (a CUDA graph replay reads them there without running any of our Python). Finished
    requests give their bands back."""
    from seqtopk.routing.paged import mark_stale

    source = WORKER.source
    if source.prompt_lens is None or not serves_seqtopk(runner):
        return
    rows = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:rows])
    finished = getattr(scheduler_output, "finished_req_ids", None) or ()
    if SKIP_UNCHANGED and not finished and req_ids == source.rows_of:
        return  # the same requests in the same rows (most decode steps): the buffers already hold their values
    source.rows_of = req_ids
    source.prompt_lens[:rows].copy_(runner.input_batch.num_prompt_tokens_cpu_tensor[:rows], non_blocking=True)
    if source.bands is None:
        return
    source.bands.release(finished)
    stale: list[int] = []
    bands = source.bands.assign(req_ids, stale)
    if stale:
        index = torch.tensor(stale, dtype=torch.long, device=runner.device)
        for router in WORKER.routers.values():
            if router.bands is not None:
                mark_stale(router.bands, index)
    source.row_band[:rows].copy_(torch.tensor(bands, dtype=torch.long), non_blocking=True)
