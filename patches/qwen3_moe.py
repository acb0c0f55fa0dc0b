"""Qwen3-MoE: softmax, renormalise iff norm_topk_prob. Router: block.gate."""

from seqtopk.patches import qwen2_moe
from seqtopk.patches._base import Family
from seqtopk.routing.scoring import SoftmaxScoring

FAMILY = Family(
    name="qwen3_moe",
    block_classes=("Qwen3MoeSparseMoeBlock",),
    router_attr="gate",
    logits=qwen2_moe.logits,  # same router as Qwen2-MoE, without the shared expert
    scoring=lambda router: SoftmaxScoring(renormalize=bool(router.norm_topk_prob)),
    outputs=qwen2_moe.outputs,
)
