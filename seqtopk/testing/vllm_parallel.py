"""Run one request through a tensor- or pipeline-parallel vLLM engine with SeqTopK and read what every rank did.

Shared by tests/vllm/test_parallel.py and evals/verify_vllm_parallel.py. One engine per call: its ranks'
expert choices per model layer (from `collective_rpc("seqtopk_trace")`, one list per worker), the greedy
tokens, each rank's routing-state rows while it routed the request (in the trace records) and once the request
finished and a second one was aborted (`collective_rpc("seqtopk_stats")`), and whether a dummy batch moved any
state. Callers compare the choices with the transformers path.

vLLM on CPU pins each rank's OpenMP threads to cores; its automatic binding needs a NUMA node per rank, so `one_core_per_rank()` sets VLLM_CPU_OMP_THREADS_BIND to
"0|1|..." unless the caller set it. Engine processes are spawned: scripts must start them from under
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
HELD_TOKENS = 150  # the request aborted after its first token


def one_core_per_rank(world_size: int) -> str:
    """Bind rank r's threads to core r (unless the caller chose a binding); returns the binding in use."""
    os.environ.setdefault(BIND_ENV, "|".join(str(rank) for rank in range(world_size)))
    return os.environ[BIND_ENV]


def layer_number(layer_name: str) -> int:
    """'model.layers.3.mlp.experts' -> 3 (the model's own layer index, whatever stage or rank holds it)."""
    match = re.search(r"layers\.(\d+)\.", layer_name)
    if match is None:
        raise ValueError(f"cannot read a layer number from MoE layer name {layer_name!r}")
    return int(match.group(1))


def choices_by_layer(records: list) -> dict:
    """One worker's trace records -> {request id: {model layer: {position: sorted expert ids}}}."""
    out: dict = {}
    for record in records:
        layer = layer_number(record["layer_name"])
        for row, position, ids in zip(record["row"], record["position"], record["ids"]):
            req = record["req_ids"][row]
            out.setdefault(req, {}).setdefault(layer, {})[position] = sorted(i for i in ids if i >= 0)
    return out


@dataclass
class ParallelRun:
    tokens: list[int]  # greedy tokens generated
    choices: list[dict]  # per worker (rank order): {model layer: {position: expert ids}} of the one request
    rows_running: list[int]  # per worker: most routing-state rows in use while it routed the request
    rows_after: list[int]  # per worker: rows still held once requests finished or were aborted (most of the two)
    layers: list[list[str]] = field(default_factory=list)  # per worker: the MoE layers it routes
    dummy_changed: list[bool] = field(default_factory=list)  # per worker: a dummy batch moved its state (TP runs)


def run_request(path, settings: dict, prompt: list[int], max_tokens: int, *, tensor_parallel: int = 1,
                pipeline_parallel: int = 1, **engine_options) -> ParallelRun:
    """Start an engine on `path` with SeqTopK `settings` at the given parallel sizes, generate greedily from
    `prompt`, and shut it down. Raises whatever vLLM raises when the engine cannot start."""
    from vllm import LLM, SamplingParams, TokensPrompt

    one_core_per_rank(tensor_parallel * pipeline_parallel)
    options = dict(dtype="float32", max_model_len=256, max_num_seqs=8, seed=0, block_size=32,
                   distributed_executor_backend="mp")
    options.update(engine_options)
    llm = LLM(str(path), tensor_parallel_size=tensor_parallel, pipeline_parallel_size=pipeline_parallel,
              additional_config={"seqtopk": settings}, **options)
    try:
        engine = llm.llm_engine
        llm.collective_rpc("seqtopk_trace", args=(True,))
        tokens = _generate(engine, "compared", prompt, max_tokens)
        traces = llm.collective_rpc("seqtopk_trace", args=(False,))
        rows_done = _rows_once_released(llm)
        # Released on abort too: a request aborted after its first token.
        engine.add_request("aborted", TokensPrompt(prompt_token_ids=list(prompt)),
                           SamplingParams(max_tokens=HELD_TOKENS, temperature=0, ignore_eos=True))
        while not any(output.outputs[0].token_ids for output in engine.step()):
            pass
        engine.abort_request(["aborted"])
        rows_aborted = _rows_once_released(llm)
        dummy_changed = []
        if pipeline_parallel == 1:
            # What an idle data-parallel rank runs to keep in step with busy ones: it must route no request.
            before = llm.collective_rpc("seqtopk_stats")
            llm.collective_rpc("execute_dummy_batch")
            dummy_changed = [_touched(b, a) for b, a in zip(before, llm.collective_rpc("seqtopk_stats"))]
        layers = [s["layers"] for s in llm.collective_rpc("seqtopk_stats")]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    choices = [next(iter(choices_by_layer(records).values()), {}) for records in traces]
    # Read by each rank as it routed the request (asking from here races the engine core, which runs ahead).
    rows_running = [max((r["state_rows"] for r in records), default=0) for records in traces]
    return ParallelRun(tokens=tokens, choices=choices, rows_running=rows_running,
                       rows_after=[max(done, aborted) for done, aborted in zip(rows_done, rows_aborted)],
                       layers=layers, dummy_changed=dummy_changed)


def _generate(engine, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    from vllm import SamplingParams, TokensPrompt

    engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)),
                       SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = list(output.outputs[0].token_ids)
    return tokens


def _rows(llm) -> list[int]:
    return [s["state_rows_in_use"] for s in llm.collective_rpc("seqtopk_stats")]


def _rows_once_released(llm, timeout: float = 30.0) -> list[int]:
    """Each rank's state rows once the engine core has told its workers that requests ended (it does so on its
    own, with the next step it schedules), or what they still hold after `timeout` s."""
    deadline = time.monotonic() + timeout
    while any(rows := _rows(llm)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return rows


def _touched(before: dict, after: dict) -> bool:
    """Whether routing counters or state rows moved between two seqtopk_stats snapshots of one worker (routing
    that writes a request's state also adds to the counters, in the same step)."""
    keys = ("prompt_tokens", "generated_tokens", "state_rows_in_use")
    return any(before[k] != after[k] for k in keys) or before["expert_rows"] != after["expert_rows"]


def transformers_choices(path, tokens: list[int], settings: dict) -> tuple[dict, list[int]]:
    """{layer: {position: sorted expert ids}} and greedy next tokens from seqtopk.patch, one forward in float32
    (compare under prefill="causal": it equals vLLM's chunked and decode steps)."""
    import torch
    from transformers import AutoModelForCausalLM

    import seqtopk

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqtopk.patch(model, **settings)
    with torch.no_grad(), seqtopk.trace_routing(model) as trace:
        logits = model(torch.tensor([tokens])).logits
    ids = trace.forwards[0].ids[:, 0]  # [layers, T, cap]
    choices = {layer: {pos: sorted(i for i in ids[layer, pos].tolist() if i >= 0) for pos in range(len(tokens))}
               for layer in range(ids.shape[0])}
    return choices, logits[0].argmax(-1).tolist()


def compare(run: ParallelRun, expected: dict, next_tokens: list[int], prompt_len: int, *,
            tensor_parallel: int, pipeline_parallel: int) -> dict:
    """What agrees and what does not, as named checks (True = passed) plus counts for the record.

    expected/next_tokens: transformers_choices over prompt + run.tokens[:-1] (the last sampled token is never
    fed back). Under TP every rank routes every layer and must equal the others exactly; under PP each stage
    routes its own layers and together they cover the model's."""
    routed_layers = [sorted(c) for c in run.choices]
    if pipeline_parallel > 1:
        merged: dict = {}
        for worker in run.choices:
            for layer, positions in worker.items():
                merged.setdefault(layer, {}).update(positions)
        per_stage_disjoint = sum(len(layers) for layers in routed_layers) == len(merged)
        groups = [merged]
    else:
        merged, per_stage_disjoint = run.choices[0], True
        groups = run.choices
    mismatched = sum(1 for layer, positions in expected.items() for pos, ids in positions.items()
                     if merged.get(layer, {}).get(pos) != ids)
    total = sum(len(p) for p in expected.values())
    checks = {
        "every worker routed": all(run.choices) and len(run.choices) == tensor_parallel * pipeline_parallel,
        "ranks choose identically": all(c == run.choices[0] for c in run.choices) if pipeline_parallel == 1
        else per_stage_disjoint,
        "choices equal transformers": all(g == expected for g in groups),
        "greedy tokens equal transformers": next_tokens[prompt_len - 1:] == run.tokens,
        "state held on every rank while running": len(run.rows_running) == len(run.choices)
        and all(r > 0 for r in run.rows_running),
        "state released on every rank": all(r == 0 for r in run.rows_after),
        "dummy batches touch no state": not any(run.dummy_changed),
    }
    return dict(checks=checks, mismatched_choices=mismatched, choices=total, routed_layers=routed_layers,
                rows_running=run.rows_running, rows_after=run.rows_after, tokens=run.tokens)
