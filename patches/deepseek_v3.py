"""DeepSeek-V3: sigmoid scores, a selection-only bias, group-limited choice, scaled weights.

Router: block.gate (float32 logits). Shared experts (block.shared_experts) are outside the budget and
untouched. cap is limited to the experts of a token's topk_group groups.
"""

import torch
import torch.nn.functional as F

from seqtopk.patches._base import Family, logits_first
from seqtopk.routing.scoring import SigmoidGroupScoring


def logits(router, hidden):
    hidden = hidden.reshape(-1, router.hidden_dim)
    return F.linear(hidden.type(torch.float32), router.weight.type(torch.float32))


def scoring(router):
    return SigmoidGroupScoring(
        bias=router.e_score_correction_bias,
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        renormalize=bool(router.norm_topk_prob),
        scaling=float(router.routed_scaling_factor),
    )


FAMILY = Family(
    name="deepseek_v3",
    block_classes=("DeepseekV3MoE",),
    router_attr="gate",
    logits=logits,
    scoring=scoring,
    outputs=logits_first,
)
