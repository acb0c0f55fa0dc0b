"""Fused GPU decode kernel vs the torch rule. Runs only where CUDA and Triton are present (skipped here on CPU)."""

import pytest
import torch

from seqtopk.kernels import decode_step as fused

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and fused.triton is not None),
                                reason="needs a CUDA GPU with Triton")


@pytest.mark.parametrize("exact_budget,min_experts,renormalize", [(False, 1, True), (True, 1, False), (True, 2, True)])
def test_fused_step_equals_torch_rule(exact_budget, min_experts, renormalize):
    from seqtopk.scoring import Candidates, SoftmaxScoring
    from seqtopk.selection import select_causal

    torch.manual_seed(0)
    batch, experts, cap, k, past = 24, 64, 10, 8, 37
    logits = torch.randn(batch, experts, device="cuda") * 2
    probs = torch.softmax(logits, dim=-1)
    history = torch.full((batch, 64, cap), float("-inf"), device="cuda")
    history[:, :past] = torch.topk(torch.rand(batch, past, experts, device="cuda").softmax(-1), cap).values
    history[3, :5] = float("-inf")  # padding positions
    seen = torch.isfinite(history[..., 0]).sum(1)
    valid = torch.ones(batch, dtype=torch.bool, device="cuda")
    valid[5] = False
    expected_history = history.clone()
    stats = torch.zeros(cap + 2, dtype=torch.long, device="cuda")
    ids, weights, mask = fused.decode_step(probs, history, past, seen, valid, k, cap, min_experts, exact_budget,
                                           renormalize, stats)
    values, cand_ids = torch.topk(probs, cap)
    ref_mask = select_causal(values.unsqueeze(1), valid.unsqueeze(1), k, min_experts, exact_budget,
                             history=expected_history[:, :past], seen=seen).squeeze(1)
    assert torch.equal(mask, ref_mask)
    ref_weights = SoftmaxScoring(renormalize).weights(logits, Candidates(values, cand_ids, probs), ref_mask)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.where(mask, ids, -1), torch.where(ref_mask, cand_ids, -1))
    assert torch.equal(ids[~mask], cand_ids[:, :1].expand_as(cand_ids)[~mask])
    written = torch.where(valid.unsqueeze(1), values, float("-inf"))
    assert torch.equal(history[:, past], written)
    assert int(stats[-1]) == 1 and int(stats[:-1].sum()) == batch - 1


def test_generate_is_the_same_with_and_without_the_fused_kernel(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    import seqtopk
    import seqtopk.engines.hf as hf

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen3_moe")).cuda().eval()
    seqtopk.patch(model, cap=4)
    prompt = torch.randint(3, 259, (6, 20), generator=torch.Generator().manual_seed(0)).cuda()
    outputs, stats = [], []
    for fused_on in (True, False):
        hf._FUSED_DECODE = fused_on
        seqtopk.reset_routing_stats(model)
        outputs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                      do_sample=False))
        stats.append(seqtopk.routing_stats(model).histogram)
    hf._FUSED_DECODE = True
    assert torch.equal(outputs[0], outputs[1])
    assert stats[0] == stats[1]
