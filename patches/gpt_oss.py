"""GPT-OSS: TopK on biased logits, then softmax over the chosen logits. Router: block.router."""

import torch.nn.functional as F

from seqtopk.patches._base import Family, logits_first
from seqtopk.routing.scoring import ChosenSoftmaxScoring


def logits(router, hidden):
    return F.linear(hidden.reshape(-1, router.hidden_dim), router.weight, router.bias)


FAMILY = Family(
    name="gpt_oss",
    block_classes=("GptOssMLP",),
    router_attr="router",
    logits=logits,
    scoring=lambda router: ChosenSoftmaxScoring(),
    outputs=logits_first,
)
