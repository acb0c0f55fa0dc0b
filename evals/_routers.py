"""How sharp a router is, as every speed benchmark records it beside its figures: the normalised entropy
(softmax entropy / log E) of router logits. Scripts import it as a sibling (evals/ is scripts, not a package)."""

from __future__ import annotations

import math

import torch


def normalised_entropy(logits: torch.Tensor) -> float:
    """Mean over tokens of softmax entropy / log E for logits [..., E]: 1 is uniform, 0 one expert."""
    probs = torch.softmax(logits.float(), dim=-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return float(entropy / math.log(logits.shape[-1]))


def model_router_entropy(model, ids: torch.Tensor) -> float:
    """Mean over a transformers MoE model's layers of normalised_entropy of its router logits on `ids`."""
    with torch.no_grad():
        logits = model(ids, output_router_logits=True, use_cache=False).router_logits
    return sum(normalised_entropy(layer) for layer in logits) / len(logits)
