"""Budgets below the model's top_k in transformers: stock TopK at a reduced k (`seqtopk.topk_at`, the baseline)
routes as the checkpoint loaded with that top_k; a fractional SeqTopK budget is exact in prefill, unchanged by
padding, and streaming decode makes the choices of causal prefill."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import seqtopk


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_topk_at_a_reduced_k_equals_the_model_loaded_with_that_top_k(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    for k in (1,):
        reloaded = AutoModelForCausalLM.from_pretrained(path, num_experts_per_tok=k).eval()
        with torch.no_grad():
            expected = reloaded(x).logits
            with seqtopk.topk_at(model, k):
                got = model(x).logits
                per_token = seqtopk.routing_stats(model).mean_experts_per_token
            full = model(x).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert per_token == k
        assert (full - expected).abs().max() > 1e-3  # the model's own top_k routes differently
    assert not seqtopk.is_patched(model)
    with pytest.raises(ValueError, match="whole number"):
        with seqtopk.topk_at(model, 1.5):
            pass


def test_fractional_budget_is_exact_and_padding_free(load_tiny):
    model, tok = load_tiny("qwen3_moe")  # top-2 of 8
    seqtopk.patch(model, k=1.5, exact_budget=True)
    tok.padding_side = "left"
    texts = ["The quick brown fox jumps over", "Hi there"]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), seqtopk.trace_routing(model) as trace:
        batched = model(**enc).logits
    real = enc["attention_mask"].bool()
    chosen = trace.experts_per_token()  # [layers, batch, tokens]
    lengths = real.sum(1)
    for b in range(2):
        spent = chosen[:, b][:, real[b]].sum(-1)
        assert spent.tolist() == [int(1.5 * int(lengths[b]) + 0.5)] * chosen.shape[0]  # B(T) in every layer
        alone = tok(texts[b], return_tensors="pt")
        with torch.no_grad():
            single = model(**alone).logits
        torch.testing.assert_close(batched[b][real[b]], single[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1.5, 0.75])
def test_fractional_streaming_decode_equals_causal_prefill(load_tiny, k):
    model, _ = load_tiny("qwen3_moe")
    seqtopk.patch(model, k=k, prefill="causal")
    x = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_shot = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(24)]
    torch.testing.assert_close(torch.cat(steps, 1), one_shot, rtol=1e-4, atol=1e-4)
    # Below one expert per token some tokens take none (min_experts defaults to 0 there).
    if k < 1:
        with torch.no_grad(), seqtopk.trace_routing(model) as trace:
            model(x)
        assert (trace.experts_per_token() == 0).any()
