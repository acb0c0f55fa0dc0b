"""The fused decode kernel (Triton) against its torch reference, seqtopk.routing.rules.select_causal.

On a CUDA GPU the kernel runs natively. Everywhere else (CI) the same check runs on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1), in a child process because Triton reads that variable when the
kernel module is imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqtopk.kernels import decode_step as fused

REPO = Path(__file__).resolve().parents[2]
CASES = [(False, 1, True), (True, 1, False), (True, 2, True)]  # exact_budget, min_experts, renormalize
needs_triton = pytest.mark.skipif(fused.triton is None, reason="triton is not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused.triton is not None),
                                reason="needs a CUDA GPU with Triton")


def check_fused_step(device: str, exact_budget: bool, min_experts: int, renormalize: bool) -> None:
    """One decode step of 24 rows: fused kernel vs the torch rule (ids, weights, history write, stats)."""
    from seqtopk.routing.rules import select_causal
    from seqtopk.routing.scoring import Candidates, SoftmaxScoring

    torch.manual_seed(0)
    batch, experts, cap, k, past = 24, 64, 10, 8, 37
    logits = torch.randn(batch, experts, device=device) * 2
    probs = torch.softmax(logits, dim=-1)
    history = torch.full((batch, 64, cap), float("-inf"), device=device)
    history[:, :past] = torch.topk(torch.rand(batch, past, experts, device=device).softmax(-1), cap).values
    history[3, :5] = float("-inf")  # padding positions
    # Row 7: 17 earlier tokens beat every candidate, 20 earlier tokens have exactly this token's scores.
    # The cut (38 tokens x k) then lands where counting ties as greater would drop a candidate.
    history[7, :17] = 2.0
    history[7, 17:past] = torch.topk(probs, cap).values[7]
    seen = torch.isfinite(history[..., 0]).sum(1)
    valid = torch.ones(batch, dtype=torch.bool, device=device)
    valid[5] = False
    expected_history = history.clone()
    stats = torch.zeros(cap + 2, dtype=torch.long, device=device)
    ids, weights, mask = fused.decode_step(probs, history, past, seen, valid, k, cap, min_experts, exact_budget,
                                           renormalize, stats)
    values, cand_ids = torch.topk(probs, cap)
    ref_mask = select_causal(values.unsqueeze(1), valid.unsqueeze(1), k, min_experts, exact_budget,
                             history=expected_history[:, :past], seen=seen).squeeze(1)
    assert torch.equal(mask, ref_mask)
    ref_weights = SoftmaxScoring(renormalize).weights(logits, Candidates(values, cand_ids, probs), ref_mask)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.where(mask, ids, -1), torch.where(ref_mask, cand_ids, -1))
    assert torch.equal(ids[~mask], cand_ids[:, :1].expand_as(cand_ids)[~mask])  # "repeat_best" convention
    written = torch.where(valid.unsqueeze(1), values, float("-inf"))
    assert torch.equal(history[:, past], written)
    assert int(stats[-1]) == 1 and int(stats[:-1].sum()) == batch - 1


@needs_cuda
@pytest.mark.parametrize("exact_budget,min_experts,renormalize", CASES)
def test_fused_step_equals_torch_rule_on_cuda(exact_budget, min_experts, renormalize):
    check_fused_step("cuda", exact_budget, min_experts, renormalize)


@needs_triton
def test_fused_step_equals_torch_rule_in_the_triton_interpreter():
    calls = "; ".join(f"check_fused_step('cpu', {e}, {m}, {r})" for e, m, r in CASES)
    code = f"from tests.kernels.test_decode_step import check_fused_step; {calls}"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


@needs_cuda
def test_generate_is_the_same_with_and_without_the_fused_kernel(tiny_checkpoint, monkeypatch):
    from transformers import AutoModelForCausalLM

    import seqtopk
    import seqtopk.engines.hf.patch as hf

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen3_moe")).cuda().eval()
    seqtopk.patch(model, cap=4)
    prompt = torch.randint(3, 259, (6, 20), generator=torch.Generator().manual_seed(0)).cuda()
    outputs, stats = [], []
    for fused_on in (True, False):
        monkeypatch.setattr(hf, "_FUSED_DECODE", fused_on)
        seqtopk.reset_routing_stats(model)
        outputs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                      do_sample=False))
        stats.append(seqtopk.routing_stats(model).histogram)
    assert torch.equal(outputs[0], outputs[1])
    assert stats[0] == stats[1]
