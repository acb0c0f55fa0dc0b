"""Phi-MoE: not supported.

Its sparsemixer router picks exactly two experts one after the other (the second after masking the
first, with a Gumbel estimator in training) and weighs each from its own masked softmax. There is no single
per-expert score that a sequence-level cut could rank, so SeqTopK would not be the same method here.
"""

from seqtopk.patches._base import Family

FAMILY = Family(
    name="phimoe",
    block_classes=("PhimoeSparseMoeBlock",),
    router_attr="router",
    unsupported=(
        "Phi-MoE's sparsemixer routing chooses its two experts sequentially and has no per-expert score "
        "to rank across a sequence, so seqtopk does not patch it"
    ),
)
