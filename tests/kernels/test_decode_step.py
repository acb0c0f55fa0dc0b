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

from seqtopk.testing.require import needs

from seqtopk.kernels import decode_step as fused
from seqtopk.routing.paged import PagedLayout

REPO = Path(__file__).resolve().parents[2]
CASES = [(False, 1, True), (True, 1, False), (True, 2, True), (False, 0, False)]  # exact_budget, min_experts, renormalize
needs_triton = needs("extra", "triton is not installed (pip install triton)" if fused.triton is None else None)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused.triton is not None),
                                reason="needs a CUDA GPU with Triton")
BLOCK, CAP, K, EXPERTS = 4, 10, 8, 64


def paged_case(device: str, dtype: torch.dtype, rows: int, tokens: int, seed: int = 0):
    """`rows` histories in shuffled blocks of a store, with exact ties at the cut, -inf entries and padding.

    Token n belongs to row n; tokens past `rows` are padding, and so is row 5 (a graph's padded row)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, EXPERTS, generator=gen) * 2).to(dtype).to(device)
    probs = torch.softmax(logits.float(), dim=-1)
    context = torch.randint(0, 41, (rows,), generator=gen)
    context[0], context[5], context[7] = 0, 0, 37
    blocks = 41 // BLOCK + 1
    table = torch.randperm(rows * blocks, generator=gen).view(rows, blocks).int()
    slots = rows * blocks * BLOCK + 1
    store = torch.rand(slots, EXPERTS, generator=gen).softmax(-1).topk(CAP).values
    store[torch.rand(slots, generator=gen) < 0.05] = float("-inf")
    # Row 7: 17 earlier tokens beat every candidate, the others have exactly this token's scores: the cut then
    # lands where counting ties as greater would drop a candidate.
    layout = PagedLayout(table, BLOCK, context, 40, slots)
    slot, live = layout.slots()
    row7 = slot[7, :37]
    store[row7[:17]] = 2.0
    store[row7[17:]] = torch.topk(probs[7].cpu(), CAP).values
    seen = context.clone()
    seen[1] = max(int(seen[1]) - 3, 0)  # fewer real earlier tokens than history positions (left padding)
    valid = torch.arange(tokens) < rows
    valid[5] = False
    write = torch.full((tokens,), -1, dtype=torch.long)
    free = torch.randperm(slots - 1, generator=gen)
    used = set(slot[live].tolist())
    fresh_slots = [int(x) for x in free if int(x) not in used][:rows]
    write[:rows] = torch.tensor(fresh_slots)
    write[5] = -1
    to = lambda t: t.to(device)
    return dict(logits=logits, probs=probs, store=to(store), table=to(table), context=to(context), seen=to(seen),
                valid=to(valid), write=to(write))


def check_paged_step(device: str, exact_budget: bool, min_experts: int, renormalize: bool,
                     dtype: torch.dtype = torch.float32) -> None:
    """One decode step of 24 tokens over 20 rows: fused kernel vs the torch rule (ids, weights, store, stats)."""
    from seqtopk.budget import budget_split
    from seqtopk.routing.rules import pack, select_causal
    from seqtopk.routing.scoring import Candidates, BiasedScoring, SoftmaxScoring

    d = paged_case(device, dtype, rows=20, tokens=24)
    split = budget_split(K, CAP, min_experts, exact_budget)
    layout = PagedLayout(d["table"], BLOCK, d["context"], 40, d["store"].shape[0])
    gathered = layout.of(d["store"]).gather()
    rows = d["table"].shape[0]

    def reference(values):
        seen = torch.nn.functional.pad(d["seen"], (0, 4))
        history = torch.cat([gathered, gathered.new_full((4, *gathered.shape[1:]), float("-inf"))])
        return select_causal(values.unsqueeze(1), d["valid"].unsqueeze(1), K, min_experts, exact_budget,
                             history=history, seen=seen).squeeze(1)

    # From probabilities: the whole softmax step, recorded.
    store = d["store"].clone()
    stats = torch.zeros(CAP + 2, dtype=torch.long, device=device)
    values, weights, ids, mask = fused.paged_decode(
        d["probs"], store, d["table"], BLOCK, d["context"], d["seen"], d["valid"], split, cap=CAP, from_probs=True,
        renormalize=renormalize, write_slots=d["write"], stats_row=stats)
    ref_values, ref_ids = torch.topk(d["probs"], CAP)
    ref_mask = reference(ref_values)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(values, ref_values)
    ref_weights = SoftmaxScoring(renormalize).weights(d["logits"], Candidates(ref_values, ref_ids, d["probs"]), ref_mask)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids.long(), pack(ref_ids, ref_mask, "repeat_best"))
    expected_store = d["store"].clone()
    real = d["write"] >= 0
    expected_store[d["write"][real]] = ref_values[real]
    assert torch.equal(store, expected_store)
    padding = int((~d["valid"]).sum())
    assert int(stats[-1]) == padding and int(stats[:-1].sum()) == 24 - padding
    assert torch.equal(stats[:-1].cpu(), torch.bincount(ref_mask[d["valid"]].sum(-1).cpu(), minlength=CAP + 1))

    # From candidate values (any family; here DeepSeek-V3's group-limited sigmoid): the choice only, nothing written.
    bias = torch.linspace(-0.1, 0.1, EXPERTS, device=device)
    cand = BiasedScoring(bias=bias, n_group=8, topk_group=4, renormalize=True, scaling=2.5).candidates(
        d["logits"], CAP)
    store = d["store"].clone()
    mask = fused.paged_decode(cand.values, store, d["table"], BLOCK, d["context"], d["seen"], d["valid"], split,
                              cap=CAP, from_probs=False)
    assert torch.equal(mask, reference(cand.values))
    assert torch.equal(store, d["store"])
    assert rows == 20


@needs_cuda
@pytest.mark.parametrize("exact_budget,min_experts,renormalize", CASES)
def test_fused_step_equals_torch_rule_on_cuda(exact_budget, min_experts, renormalize):
    for dtype in (torch.float32, torch.bfloat16):
        check_paged_step("cuda", exact_budget, min_experts, renormalize, dtype)


@needs_triton
def test_fused_step_equals_torch_rule_in_the_triton_interpreter():
    calls = "; ".join(f"check_paged_step('cpu', {e}, {m}, {r})" for e, m, r in CASES)
    calls += "; check_paged_step('cpu', True, 1, True, torch.bfloat16)"
    code = f"import torch; from tests.kernels.test_decode_step import check_paged_step; {calls}"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


@needs_cuda
def test_generate_is_the_same_with_and_without_the_fused_kernel(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    import seqtopk
    from seqtopk.kernels import backend

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen3_moe")).cuda().eval()
    seqtopk.patch(model, cap=4)
    prompt = torch.randint(3, 259, (6, 20), generator=torch.Generator().manual_seed(0)).cuda()
    outputs, stats = [], []
    for path in (backend.TRITON, backend.TORCH):
        seqtopk.reset_routing_stats(model)
        with backend.forced(path):
            outputs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                          do_sample=False))
        stats.append(seqtopk.routing_stats(model).histogram)
    assert torch.equal(outputs[0], outputs[1])
    assert stats[0] == stats[1]
