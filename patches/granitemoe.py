"""Granite-MoE: TopK on float32 logits, then softmax over the chosen ones. Router: block.router.

Its router returns (ids, weights, logits): logits last.
"""

import torch.nn.functional as F

from seqtopk.patches._base import Family
from seqtopk.routing.scoring import ChosenSoftmaxScoring


def logits(router, hidden):
    return F.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight).float()


def outputs(router, logits, weights, ids):
    return ids, weights.to(router.weight.dtype), logits


FAMILY = Family(
    name="granitemoe",
    block_classes=("GraniteMoeMoE",),
    router_attr="router",
    logits=logits,
    scoring=lambda router: ChosenSoftmaxScoring(),
    outputs=outputs,
)
