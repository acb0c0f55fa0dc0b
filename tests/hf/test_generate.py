"""Streaming decode with the routing history tied to the KV cache: generate, beam search, assisted decoding."""

import pytest
import torch
from transformers import DynamicCache

import seqtopk


def prompts_batch(tok, side="left"):
    tok.padding_side = side
    return tok(["The quick brown fox jumps", "Hi"], return_tensors="pt", padding=True)


# Token by token is checked for every family in tests/hf/test_families.py; chunks too here.
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_causal_one_shot_equals_cached_token_by_token(load_tiny, family):
    model, _ = load_tiny(family)
    seqtopk.patch(model, prefill="causal")
    x = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_shot = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(24)]
        cache = DynamicCache(config=model.config)
        chunks = [model(x[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in ((0, 9), (9, 24))]
    torch.testing.assert_close(torch.cat(steps, 1), one_shot, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(chunks, 1), one_shot, rtol=1e-4, atol=1e-4)


def test_sequence_prefill_is_not_causal(load_tiny):
    model, _ = load_tiny("qwen3_moe")
    seqtopk.patch(model)  # prefill="sequence": a token's experts depend on later tokens
    x = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x).logits[:, :12]
        prefix = model(x[:, :12]).logits
    assert (full - prefix).abs().max() > 1e-4


def test_generate_calls_do_not_share_state(load_tiny):
    model, tok = load_tiny("olmoe")
    seqtopk.patch(model)
    enc = prompts_batch(tok)
    with seqtopk.trace_routing(model) as first:
        out1 = model.generate(**enc, max_new_tokens=8, do_sample=False)
    with seqtopk.trace_routing(model) as second:
        out2 = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(first.forwards, second.forwards))
    patch = seqtopk.engines.hf.require_patch(model)
    # Each generate call made its own cache, hence its own routing state.
    assert len({id(s) for s in patch._states.values()}) == len(patch._states)


def test_streaming_decode_uses_the_history(load_tiny):
    model, tok = load_tiny("qwen3_moe")
    enc = prompts_batch(tok)
    seqtopk.patch(model, decode="topk")
    topk_decode = model.generate(**enc, max_new_tokens=12, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    seqtopk.patch(model, decode="expert_cache")
    with seqtopk.trace_routing(model) as trace:
        cached = model.generate(**enc, max_new_tokens=12, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    decode_counts = trace.experts_per_token()[:, :, enc["input_ids"].shape[1]:]
    assert decode_counts.max() > model.config.num_experts_per_tok, "decode steps should vary their experts"
    diff = max((a - b).abs().max().item() for a, b in zip(topk_decode.logits[1:], cached.logits[1:]))
    assert diff > 1e-4


def test_beam_search_keeps_history_with_its_beam(load_tiny):
    model, tok = load_tiny("mixtral")
    seqtopk.patch(model, prefill="causal")
    enc = prompts_batch(tok)
    out = model.generate(**enc, max_new_tokens=10, num_beams=4, do_sample=False, length_penalty=0.0,
                         early_stopping=True, return_dict_in_generate=True, output_scores=True)
    prompt_len = enc["input_ids"].shape[1]
    with torch.no_grad():
        mask = torch.cat([enc["attention_mask"], torch.ones_like(out.sequences[:, prompt_len:])], dim=1)
        logits = model(out.sequences, attention_mask=mask).logits
    logprobs = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), dim=-1)
    generated = out.sequences[:, prompt_len:]
    token_logprobs = logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    eos = model.generation_config.eos_token_id
    keep = torch.ones_like(generated, dtype=torch.bool)
    # Beam scores stop at EOS; one-shot causal routing of the final beams must reproduce them.
    for i, row in enumerate(generated):
        hits = (row == eos).nonzero()
        if len(hits):
            keep[i, hits[0, 0] + 1:] = False
    recomputed = (token_logprobs * keep).sum(-1)
    torch.testing.assert_close(recomputed, out.sequences_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill", ["sequence", "causal"])
def test_assisted_decoding_matches_plain_greedy(load_tiny, tiny_checkpoint, prefill):
    from transformers import AutoModelForCausalLM

    model, tok = load_tiny("qwen2_moe")
    # A differently seeded draft model proposes tokens the target mostly rejects: every rejection crops
    # the cache, and the routing history must be cropped with it.
    draft = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen2_moe", seed=1)).eval()
    seqtopk.patch(model, prefill=prefill)
    enc = tok("Once upon a time there was", return_tensors="pt")
    plain = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assisted = model.generate(**enc, max_new_tokens=16, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, assisted)
