"""Mixtral: softmax over all experts, TopK, always renormalised. Router: block.gate."""

import torch.nn.functional as F

from seqtopk.patches._base import Family, logits_first
from seqtopk.routing.scoring import SoftmaxScoring


def logits(router, hidden):
    return F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)


FAMILY = Family(
    name="mixtral",
    block_classes=("MixtralSparseMoeBlock",),
    router_attr="gate",
    logits=logits,
    scoring=lambda router: SoftmaxScoring(renormalize=True),
    outputs=logits_first,  # weights stay float32, as Mixtral's router leaves them
)
