"""OLMoE: softmax, renormalise iff norm_topk_prob. Router: block.gate."""

from seqtopk.patches import qwen2_moe
from seqtopk.patches._base import Family
from seqtopk.routing.scoring import SoftmaxScoring

FAMILY = Family(
    name="olmoe",
    block_classes=("OlmoeSparseMoeBlock",),
    router_attr="gate",
    logits=qwen2_moe.logits,  # OLMoE's router computes logits and casts weights as Qwen2-MoE's does
    scoring=lambda router: SoftmaxScoring(renormalize=bool(router.norm_topk_prob)),
    outputs=qwen2_moe.outputs,
)
