"""seqtopk.patch on real transformers MoE models: API contract, exactness, budgets, batch invariance."""

import pytest
import torch

import seqtopk
from seqtopk.engines.hf import UnsupportedModelError


def random_ids(batch, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, length), generator=gen)


def first_moe_block(model):
    from seqtopk.patches import family_for_block

    return next(m for m in model.modules() if family_for_block(m) is not None)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_exact_budget_spends_t_times_k_per_sequence(load_tiny, family):
    model, tok = load_tiny(family)
    k = model.config.num_experts_per_tok
    tok.padding_side = "left"
    enc = tok(["a longer prompt that has quite a few tokens", "short one"], return_tensors="pt", padding=True)
    seqtopk.patch(model, exact_budget=True)
    with torch.no_grad(), seqtopk.trace_routing(model) as trace:
        model(**enc)
    record = trace.forwards[0]
    real = enc["attention_mask"].sum(1)
    per_sequence = record.experts_per_token.sum(dim=2)  # [layers, B]
    assert (per_sequence == real * k).all()
    assert (record.experts_per_token[:, ~record.valid] == 0).all(), "padding took experts"
    assert record.experts_per_token[:, record.valid].max() > k, "some token should take more than k"


def test_patch_is_idempotent_and_validates_before_touching(load_tiny):
    model, _ = load_tiny("mixtral")
    block = first_moe_block(model)
    seqtopk.patch(model, cap=3)
    seqtopk.patch(model, cap=3)
    assert seqtopk.is_patched(model)
    x = random_ids(1, 12)
    with torch.no_grad():
        before = model(x).logits
    for bad in (dict(cap=99), dict(k=0), dict(cap=1, k=2), dict(prefill="both"), dict(decode="x"),
                dict(min_experts=5), dict(exact_budget="yes")):
        with pytest.raises(ValueError):
            seqtopk.patch(model, **bad)
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after), "a rejected config must leave the previous patch in place"
    seqtopk.unpatch(model)
    seqtopk.unpatch(model)
    assert "forward" not in block.gate.__dict__ and "forward" not in block.experts.__dict__
    assert not seqtopk.is_patched(model)


def test_unsupported_models_get_a_clear_error(tiny_checkpoint, load_tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="Supported families: mixtral.*patches/"):
        seqtopk.patch(dense)
    phi, _ = load_tiny("phimoe")
    with pytest.raises(UnsupportedModelError, match="sparsemixer"):
        seqtopk.patch(phi)
    assert not seqtopk.is_patched(phi)


# Every family is checked with left padding in tests/hf/test_families.py; both sides here.
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_batch_invariance_left_and_right_padding(load_tiny, family):
    model, tok = load_tiny(family)
    seqtopk.patch(model)
    prompts = ["The rain in Spain stays mainly in the plain.", "Hello", "MoE routing by sequence, not by token"]
    with torch.no_grad():
        alone = [model(**tok(p, return_tensors="pt")).logits[0] for p in prompts]
        for side in ("left", "right"):
            tok.padding_side = side
            enc = tok(prompts, return_tensors="pt", padding=True)
            batched = model(**enc).logits
            for i, ref in enumerate(alone):
                got = batched[i][enc["attention_mask"][i].bool()]
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{side} padding, prompt {i}")


def test_repeated_tokens_tie_and_resolve_deterministically(load_tiny):
    model, _ = load_tiny("qwen3_moe")
    seqtopk.patch(model, exact_budget=True)
    x = torch.tensor([[65] * 12 + list(range(70, 90))])  # the same token 12 times: identical router scores
    runs = []
    for _ in range(2):
        with torch.no_grad(), seqtopk.trace_routing(model) as trace:
            model(x)
        runs.append(trace.forwards[0].ids)
    assert torch.equal(runs[0], runs[1])
    per_token = runs[0][0, 0].ge(0).sum(-1)
    assert per_token.sum() == x.shape[1] * model.config.num_experts_per_tok
    # Exact ties straddling the cut, through the patched router: 12 identical rows with a peaked score
    # (second-best probability ~0.07) next to 4 flat rows whose 2nd and 3rd probabilities (~0.31) beat it.
    # The budget is 16 pairs beyond each token's forced best; the flat rows take 8, so 8 of the 12 tied
    # second-best scores fit: exactly the 8 earliest.
    gate = first_moe_block(model).gate
    tied_logits = torch.tensor([3.0, 0.5, 0, 0, -1, -1, -1, -1])
    flat_logits = torch.tensor([1.0, 1.0, 1.0, -2, -2, -2, -2, -2])
    logits = torch.stack([tied_logits] * 12 + [flat_logits] * 4)
    hidden = logits @ torch.linalg.pinv(gate.weight.detach()).T  # the router's logits are hidden @ weight.T
    with torch.no_grad():
        got_logits, _, ids = gate(hidden)  # a router called on its own routes its rows as one sequence
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=1e-4)
    assert torch.equal(got_logits[:12], got_logits[:1].expand(12, -1)), "the tied rows must tie exactly"
    assert ids[:12].ge(0).sum(-1).tolist() == [2] * 8 + [1] * 4


def test_deepseek_keeps_groups_bias_and_scaling(load_tiny):
    model, _ = load_tiny("deepseek_v3")
    block = first_moe_block(model)
    gate = block.gate
    seqtopk.patch(model, cap=4)
    hidden = torch.randn(1, 30, model.config.hidden_size)
    with torch.no_grad():
        logits, weights, ids = gate(hidden)  # router called on its own: routes one sequence
    chosen = ids >= 0
    group_size = gate.num_experts // gate.num_group
    groups_used = [torch.unique(row[row >= 0] // group_size).numel() for row in ids]
    assert max(groups_used) <= gate.topk_group
    scores = torch.sigmoid(logits)  # unbiased
    expected = scores.gather(1, ids.clamp(min=0)) * chosen
    expected = expected / (expected.sum(-1, keepdim=True) + 1e-20) * gate.routed_scaling_factor
    torch.testing.assert_close(weights, expected)
    assert (gate.e_score_correction_bias != 0).any()


def test_shared_expert_is_outside_the_budget(load_tiny):
    model, _ = load_tiny("qwen2_moe")
    seqtopk.patch(model)
    block = first_moe_block(model)
    assert "forward" not in block.shared_expert.__dict__ and "forward" not in block.shared_expert_gate.__dict__
    x = random_ids(1, 10)
    with torch.no_grad():
        full = model(x).logits
        original = block.shared_expert_gate.weight.clone()
        block.shared_expert_gate.weight.fill_(-1e4)  # sigmoid -> 0: shared expert off
        without = model(x).logits
        block.shared_expert_gate.weight.copy_(original)
    assert (full - without).abs().max() > 1e-4


def test_routing_stats_count_real_tokens(load_tiny):
    model, tok = load_tiny("olmoe")
    seqtopk.patch(model)
    seqtopk.reset_routing_stats(model)
    tok.padding_side = "right"
    enc = tok(["one two three four five", "six"], return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**enc)
    stats = seqtopk.routing_stats(model)
    real = int(enc["attention_mask"].sum())
    assert stats.tokens == [real] * model.config.num_hidden_layers
    assert all(sum(h) == real for h in stats.histogram)
    assert all(a >= real * model.config.num_experts_per_tok for a in stats.assignments)
    assert "experts/token" in str(stats)
    seqtopk.reset_routing_stats(model)
    assert seqtopk.routing_stats(model).tokens == [0] * model.config.num_hidden_layers


def test_a_router_called_after_a_forward_does_not_reuse_its_view(load_tiny):
    """The forward's sequence view is handed to routers only while that forward runs: a later standalone call
    with the same token count routes its rows as one sequence of real tokens, as on a fresh patch."""
    model, tok = load_tiny("olmoe")
    gate = first_moe_block(model).gate
    hidden = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    seqtopk.patch(model)
    with torch.no_grad():
        fresh = gate(hidden)
        tok.padding_side = "right"
        enc = tok(["abcde", "ab"], return_tensors="pt", padding=True)
        assert enc["input_ids"].numel() == 10 and not enc["attention_mask"].all()
        model(**enc)  # its view: 2 sequences of 5 tokens, some of them padding
        after = gate(hidden)
    for got, expected in zip(after, fresh):
        assert torch.equal(got, expected)
