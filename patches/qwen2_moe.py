"""Qwen2-MoE: softmax, renormalise iff norm_topk_prob. Router: block.gate.

The gated shared expert (block.shared_expert) is outside the budget and is left untouched: only the
router and the routed experts are patched.
"""

import torch.nn.functional as F

from seqtopk.patches._base import Family
from seqtopk.routing.scoring import SoftmaxScoring


def logits(router, hidden):
    return F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)


def outputs(router, logits, weights, ids):
    return logits, weights.to(logits.dtype), ids


FAMILY = Family(
    name="qwen2_moe",
    block_classes=("Qwen2MoeSparseMoeBlock",),
    router_attr="gate",
    logits=logits,
    scoring=lambda router: SoftmaxScoring(renormalize=bool(router.norm_topk_prob)),
    outputs=outputs,
)
