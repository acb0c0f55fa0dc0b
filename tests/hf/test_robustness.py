"""Faults and bad input around a patched model: interrupted generate calls, failing forwards, threads.

After any of them the model routes exactly as if freshly patched, unpatches to its stock logits bit for bit,
and keeps nothing of the failed call (forward view, routing history, half a trace record).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

import seqtopk
from seqtopk.testing.tiny import VOCAB_SIZE

FAMILY = "qwen3_moe"
GENERATE = dict(max_new_tokens=6, do_sample=False)
IDS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


class Interrupted(RuntimeError):
    """The fault these tests inject."""


def prompts(tok):
    tok.padding_side = "left"
    return tok(["The quick brown fox jumps", "Hi"], return_tensors="pt", padding=True)


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def routed_generate(model, enc):
    """Tokens, experts per token and routing stats of one generate call on its own (stats reset first)."""
    seqtopk.reset_routing_stats(model)
    with seqtopk.trace_routing(model) as trace:
        tokens = model.generate(**enc, **GENERATE)
    return tokens, trace.experts_per_token(), seqtopk.routing_stats(model).as_dict()


def assert_same_run(got, expected):
    assert torch.equal(got[0], expected[0]), "generated tokens differ"
    assert torch.equal(got[1], expected[1]), "experts per token differ"
    assert got[2] == expected[2], "routing stats differ"


class RaiseOnCall(StoppingCriteria):
    """Raises on its n-th call, i.e. between two forwards of a generate call."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids, scores, **kwargs):
        self.n -= 1
        if self.n == 0:
            raise Interrupted("stopping criteria")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def layer_raises(layer: torch.nn.Module, on_call: int):
    """A forward hook on a decoder layer that raises on its n-th call, i.e. in the middle of a forward."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
        if calls[0] == on_call:
            raise Interrupted(f"decoder layer, call {on_call}")

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def interrupt(model, enc, how: str) -> None:
    layers = model.model.layers
    if how == "stopping criteria":
        model.generate(**enc, **GENERATE, stopping_criteria=StoppingCriteriaList([RaiseOnCall(3)]))
    else:
        where, call = {"first layer, prefill": (layers[0], 1), "first layer, decode step": (layers[0], 3),
                       "last layer, decode step": (layers[-1], 3)}[how]
        with layer_raises(where, call):
            model.generate(**enc, **GENERATE)


@pytest.mark.parametrize("how", ["stopping criteria", "first layer, prefill", "first layer, decode step",
                                 "last layer, decode step"])
def test_an_interrupted_generate_leaves_nothing_behind(load_tiny, how):
    model, tok = load_tiny(FAMILY)
    enc = prompts(tok)
    stock = logits(model)
    seqtopk.patch(model)
    fresh = routed_generate(model, enc)

    with seqtopk.trace_routing(model) as trace, pytest.raises(Interrupted):
        interrupt(model, enc, how)
    # Only whole forwards are traced: a forward that raised in its first layer routed only part of the model.
    assert all(r.ids.shape[0] == model.config.num_hidden_layers for r in trace.forwards)
    patch = seqtopk.engines.hf.require_patch(model)
    assert patch._view is None and patch._pending is None and all(l.plan is None for l in patch.layers)

    assert_same_run(routed_generate(model, enc), fresh)
    seqtopk.unpatch(model)
    assert torch.equal(logits(model), stock)
    seqtopk.patch(model, cap=3)  # patchable again, with other settings, and again with the first ones
    seqtopk.patch(model)
    assert_same_run(routed_generate(model, enc), fresh)
    seqtopk.unpatch(model)
    assert torch.equal(logits(model), stock)


BAD_INPUTS = {
    "ids past the vocabulary": (lambda: dict(input_ids=torch.full_like(IDS, VOCAB_SIZE + 5)), IndexError, "out of range"),
    "negative ids": (lambda: dict(input_ids=-IDS), IndexError, "out of range"),
    "ids without a batch dimension": (lambda: dict(input_ids=IDS[0]), ValueError, "input_ids must be"),
    "mask shorter than the input": (lambda: dict(input_ids=IDS, attention_mask=torch.ones(2, 5, dtype=torch.long)),
                                    ValueError, r"attention_mask has shape \(2, 5\)"),
    "mask of another batch": (lambda: dict(input_ids=IDS, attention_mask=torch.ones(3, 12, dtype=torch.long)),
                              ValueError, r"attention_mask has shape \(3, 12\)"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_a_failing_forward_raises_and_the_next_call_is_unaffected(load_tiny, bad):
    model, tok = load_tiny(FAMILY)
    enc = prompts(tok)
    seqtopk.patch(model)
    expected_logits, expected_run = logits(model), routed_generate(model, enc)
    inputs, error, message = BAD_INPUTS[bad]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(**inputs())
    assert torch.equal(logits(model), expected_logits)
    assert_same_run(routed_generate(model, enc), expected_run)


def test_a_one_row_mask_still_applies_to_every_row(load_tiny):
    model, _ = load_tiny(FAMILY)
    seqtopk.patch(model)
    assert torch.equal(logits(model, attention_mask=torch.ones(1, 12, dtype=torch.long)), logits(model))


def test_a_failing_step_does_not_disturb_the_cache_it_continues(load_tiny):
    """A decode step that raises before its first layer leaves the KV cache as it was; its routing history
    must be left as it was too, so the next good steps route as if the failure never happened."""
    model, _ = load_tiny(FAMILY)
    seqtopk.patch(model)  # decode="expert_cache": steps read the history tied to the cache
    steps = torch.randint(3, 259, (3, 2, 1), generator=torch.Generator().manual_seed(1))

    def decode(fail: bool):
        cache = DynamicCache(config=model.config)
        out = [logits(model, IDS, past_key_values=cache, use_cache=True)]
        for step in steps:
            if fail:
                with pytest.raises(IndexError):
                    logits(model, torch.full_like(step, VOCAB_SIZE + 5), past_key_values=cache, use_cache=True)
                with pytest.raises(ValueError, match="attention_mask"):
                    logits(model, step, past_key_values=cache, use_cache=True,
                           attention_mask=torch.ones(3, 13, dtype=torch.long))
            out.append(logits(model, step, past_key_values=cache, use_cache=True))
        return out

    clean, disturbed = decode(fail=False), decode(fail=True)
    assert all(torch.equal(a, b) for a, b in zip(clean, disturbed))


def session(model, tok, settings: dict):
    """Stock logits, a patched generate (tokens, experts per token, stats), then the logits after unpatching."""
    enc = prompts(tok)
    stock = logits(model)
    seqtopk.patch(model, **settings)
    run = routed_generate(model, enc)
    seqtopk.unpatch(model)
    return stock, run, logits(model)


def test_threads_patching_their_own_models_match_single_threaded_runs(load_tiny):
    # Two models of the same class (a class-level change would leak between them) and one of another, each
    # with its own settings.
    jobs = [(*load_tiny("qwen3_moe"), dict(cap=4)), (*load_tiny("qwen3_moe", seed=1), dict(prefill="causal")),
            (*load_tiny("olmoe"), dict(k=1, cap=3))]
    expected = [session(*job) for job in jobs]
    for stock, _, after in expected:
        assert torch.equal(after, stock)
    rounds = 3
    barrier = threading.Barrier(len(jobs))

    def worker(job):
        results = []
        for _ in range(rounds):
            barrier.wait(timeout=60)  # every round starts together, so patch, generate and unpatch interleave
            results.append(session(*job))
        return results

    with ThreadPoolExecutor(len(jobs)) as pool:
        threaded = list(pool.map(worker, jobs))
    for i, (results, (stock, run, _)) in enumerate(zip(threaded, expected)):
        for got_stock, got_run, got_after in results:
            assert torch.equal(got_stock, stock) and torch.equal(got_after, stock), f"model {i}: stock logits changed"
            assert_same_run(got_run, run)
