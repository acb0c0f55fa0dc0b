"""Long generations under forced preemption, in the default configuration (sequence prefill, streaming
"expert_cache" decode, the default k and cap), on the shared serving engine whose KV cache is so small that vLLM
preempts and recomputes requests: every token's chosen slots, in every layer and every routing (recomputes and
the routings they replaced), are the torch rule's on the scores the engine computed, and the decode bands the
compiled kernel answers from are rebuilt along the way (the counts are printed in the test output).

What the rule says after a preemption. vLLM frees a preempted request's KV blocks, and with them its routing
history (the store rows live in those blocks); the recompute re-prefills the prompt and every token generated so
far from position 0. That forward starts a new routing of the sequence, an "incarnation" here: its prompt tokens
follow the sequence rule over the prompt (as the first prefill did), every later position, re-prefilled generated
tokens and new ones alike, the streaming rule over the incarnation's own scores of all positions before it. So
the history is rebuilt, not remembered: the choices of every token after a recompute are select_causal over the
whole sequence as recomputed. Each incarnation is checked on its own, the preempted ones included.

Decode bands (seqtopk/kernels/cpu/history.h). For each request and layer the kernel keeps the 256 distinct history
values nearest the streaming cut and answers a decode step from them. It builds the band from the store when the
band is stale (a request's first decode step, and the first one after any forward of several tokens: a prefill or
a recompute) and rebuilds it when the cut has left it. Under the defaults a token adds 4 competing scores and moves
the cut by k = 2 ranks: a band is 64 tokens' worth of scores, and a cut moving at its fastest leaves a band built
around it after 64 tokens (127 ranks). Scores that keep one distribution do not move it that far (the band drops
values on the side away from the cut): freely sampled generations stay in one band for all 350 tokens the engine
holds (measured). The DRIFTING requests move the cut: a prompt of one token repeated, so that the band built at
the first decode step holds nothing but copies of that token's 2nd and 3rd best scores, then one allowed token,
chosen by scanning the tiny checkpoint's tokens for scores above that band in both layers. Each step adds values
above the band and the cut climbs out of it.
"""

from __future__ import annotations

import random

import pytest

from seqtopk.testing.rule_check import routings, rule_mismatches

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NATURAL = 3  # requests that sample freely after a random prompt
DRIFTING = ((5, 167), (32, 167), (39, 198))  # (prompt token repeated, the one token generated)
DRIFT_PROMPT = 150  # >= 128 repeats: the first band, 127 ranks either side of the cut, holds only their 2nd/3rd best


def decode_runs(incarnations: list) -> int:
    """Runs of consecutive decode forwards (one token, not the start of a routing) of one request in one layer:
    each starts on a band the kernel must build (a new request's band is stale, and any forward of several tokens,
    a prefill or a recompute, leaves it stale). Band builds beyond these are rebuilds because the streaming cut
    left the band."""
    runs, decoding = 0, False
    for incarnation in incarnations:
        for forward in incarnation:
            decode = len(forward) == 1 and 0 not in forward
            runs += decode and not decoding
            decoding = decode
    return runs


def replayed(incarnations: list) -> tuple[int, int]:
    """(positions a recompute routed again, how many of them it chose differently from the routing it replaced)."""
    again = changed = 0
    for before, after in zip(incarnations, incarnations[1:]):
        earlier = {p: token[1] for forward in before for p, token in forward.items()}
        for forward in after:
            for p, token in forward.items():
                if p in earlier:
                    again += 1
                    changed += token[1] != earlier[p]
    return again, changed


def requests(context: int, seed: int = 0):
    """Prompts and sampling of the long generations, each filling `context` tokens: NATURAL requests sample
    freely after a random prompt; DRIFTING ones repeat one token and generate another."""
    from vllm import SamplingParams, TokensPrompt

    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(NATURAL):
        prompt = [rng.randrange(4, 300) for _ in range(rng.randrange(16, 48))]
        prompts.append(prompt)
        params.append(SamplingParams(max_tokens=context - len(prompt), temperature=1.0, seed=seed + i,
                                     ignore_eos=True))
    for repeated, generated in DRIFTING:
        prompts.append([repeated] * DRIFT_PROMPT)
        params.append(SamplingParams(max_tokens=context - DRIFT_PROMPT, allowed_token_ids=[generated],
                                     ignore_eos=True))
    return [TokensPrompt(prompt_token_ids=p) for p in prompts], params


def tally(outputs, by_request: dict, cfg, wrong_cfg) -> dict:
    """Check every routing of every request (routings) against the rule with `cfg`, and against a rule with
    another budget (`wrong_cfg`, which must differ somewhere: the check can fail); count what the bands went
    through."""
    layers = sorted({layer for _, layer in by_request})
    out = dict(layers=len(layers), checked=0, wrong=[], wrong_rule=0, recomputes=0, decode_runs=0, replayed=0,
               replay_changed=0)
    for output in outputs:
        prompt_len = len(output.prompt_token_ids)
        engine_id = next(req for req, _ in by_request if req.startswith(output.request_id + "-"))
        for layer in layers:
            incarnations = by_request[(engine_id, layer)]
            # every prompt token and every generated one but the last (never fed back), in the last routing
            assert len({p for forward in incarnations[-1] for p in forward}) == (
                prompt_len + len(output.outputs[0].token_ids) - 1)
            out["recomputes"] += len(incarnations) - 1 if layer == layers[0] else 0
            out["decode_runs"] += decode_runs(incarnations)
            again, changed = replayed(incarnations)
            out["replayed"] += again
            out["replay_changed"] += changed
            for incarnation in incarnations:
                tokens, positions = rule_mismatches(incarnation, prompt_len, cfg)
                out["checked"] += tokens
                out["wrong"] += [(output.request_id, layer, p) for p in positions]
                out["wrong_rule"] += len(rule_mismatches(incarnation, prompt_len, wrong_cfg)[1])
    return out


def test_long_generations_under_preemption_follow_the_rule_through_band_rebuilds(serving_engine, vllm_helpers, capsys):
    import time

    from seqtopk.config import SeqTopKConfig
    from seqtopk.testing.require import require_kernels

    require_kernels()  # the bands are the compiled kernel's (the torch path walks the history and keeps none)
    config = serving_engine.llm_engine.model_config
    experts = config.hf_config.num_experts
    top_k = config.hf_config.num_experts_per_tok
    cfg = SeqTopKConfig(**vllm_helpers.settings).resolve(top_k, experts)
    assert cfg == SeqTopKConfig().resolve(top_k, experts), "the shared engine must route with the defaults"

    def preemptions() -> float:
        return sum(getattr(m, "value", 0) for m in serving_engine.get_metrics() if m.name == "vllm:num_preemptions")

    started = time.monotonic()
    preempted_before = preemptions()
    builds_before = serving_engine.collective_rpc("seqtopk_band_counters")[0]
    serving_engine.collective_rpc("seqtopk_trace", args=(True,))
    prompts, params = requests(config.max_model_len)
    outputs = serving_engine.generate(prompts, params, use_tqdm=False)
    records = serving_engine.collective_rpc("seqtopk_trace", args=(False,))[0]
    builds_after = serving_engine.collective_rpc("seqtopk_band_counters")[0]
    assert builds_after is not None, "the engine's worker routes without the compiled kernels (no bands)"
    preempted = preemptions() - preempted_before
    generated = time.monotonic() - started

    found = tally(outputs, routings(records), cfg, SeqTopKConfig(k=top_k + 1, cap=cfg.cap).resolve(top_k, experts))
    assert found["layers"] == config.hf_config.num_hidden_layers
    builds = builds_after["band_builds"] - builds_before["band_builds"]
    first = len(outputs) * found["layers"]  # each request's first decode step in each layer builds its band
    runs, recomputes, wrong = found["decode_runs"], found["recomputes"], found["wrong"]
    drift = builds - runs  # builds while a band was current: the streaming cut had left it
    with capsys.disabled():  # the counts are part of the test's output, passed or not
        print(f"\n[preemption] {len(outputs)} requests, {found['layers']} layers: {preempted:.0f} preemptions, "
              f"{recomputes} recomputes; {found['checked']} token-layer choices checked against the rule (every "
              f"routing, preempted ones included), {len(wrong)} differ; recomputes routed {found['replayed']} again, "
              f"{found['replay_changed']} differently; band builds {builds}: {first} first, {builds - first} rebuilds "
              f"({runs - first} after a recompute, {drift} because the cut left the band); generation and trace "
              f"{generated:.1f} s")
    assert preempted > 0 and recomputes > 0, "the KV cache was meant to force preemption and recompute"
    assert wrong == [], f"choices that differ from the rule (request, layer, position): {wrong[:20]}"
    assert found["wrong_rule"] > 0, "the check cannot fail"
    assert builds - first > 0 and runs > first, "no band was rebuilt after a recompute"
    assert drift > 0, ("no band was rebuilt because the streaming cut left it: the DRIFTING requests no longer "
                       "move the cut on this checkpoint (pick tokens whose scores all lie above the repeated "
                       "token's second best)")
