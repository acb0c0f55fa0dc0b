"""Two parameter-free adaptive routings, as evaluation baselines for evals/sparsity_table.py (not product
modes: they live here, outside seqtopk.routing). Each replaces the router of every OLMoE MoE layer
(transformers' OlmoeTopKRouter) inside a `with` block, so a token may take a variable number of experts:
- "top-p": a token takes its experts by falling probability until their mass reaches p (at least one);
- "entropy": a token takes k = round(scale * exp(H)) experts, H its router entropy (exp(H) is the number of
  experts the router spreads over), clamped to [1, experts]. Thresholds on H: k > j once H > log((j - 1/2) / scale).
Chosen experts keep their softmax probability as weight (OLMoE's norm_topk_prob=False rule, as TopK here).
`calibrate` bisects p or scale on held-out text until the mean experts per token (all layers) is the target.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

RULES = ("top-p", "entropy")
_PARAMETER_RANGE = {"top-p": (0.0, 1.0), "entropy": (0.0, 64.0)}


@dataclass
class Spend:
    """Experts chosen and tokens routed, summed over layers and forwards."""

    experts: int = 0
    tokens: int = 0

    @property
    def experts_per_token(self) -> float:
        return self.experts / self.tokens if self.tokens else float("nan")


def experts_per_token(probs: torch.Tensor, rule: str, parameter: float) -> torch.Tensor:
    """How many experts each token (a row of router probabilities) takes under `rule` at `parameter`."""
    num_experts = probs.shape[-1]
    if rule == "top-p":
        ordered = probs.sort(dim=-1, descending=True).values
        mass_before = ordered.cumsum(-1) - ordered
        return (mass_before < parameter).sum(-1).clamp(1, num_experts)
    if rule == "entropy":
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        return torch.round(parameter * entropy.exp()).long().clamp(1, num_experts)
    raise ValueError(f"unknown adaptive rule {rule!r}; choose one of {RULES}")


def entropy_thresholds(scale: float, num_experts: int) -> list[float]:
    """The router entropies (nats) above which a token takes its 2nd, 3rd, ... expert at `scale`."""
    return [math.log((j - 0.5) / scale) for j in range(2, num_experts + 1)] if scale > 0 else []


def _routers(model) -> list:
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    routers = [m for m in model.modules() if isinstance(m, OlmoeTopKRouter)]
    if not routers:
        raise ValueError("adaptive routing baselines need an OLMoE model (transformers' OlmoeForCausalLM)")
    return routers


@contextmanager
def adaptive_routing(model, rule: str, parameter: float):
    """Route every OLMoE layer of `model` by `rule` at `parameter` inside the block; yields the Spend."""
    if rule not in RULES:
        raise ValueError(f"unknown adaptive rule {rule!r}; choose one of {RULES}")
    spend = Spend()
    routers = _routers(model)

    def forward_of(router):
        def forward(hidden_states):
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            logits = torch.nn.functional.linear(hidden_states, router.weight)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            values, ids = probs.sort(dim=-1, descending=True)
            with torch.no_grad():
                counts = experts_per_token(probs, rule, parameter)
                spend.experts += int(counts.sum())
                spend.tokens += counts.numel()
                width = int(counts.max()) if counts.numel() else 1
                keep = torch.arange(width, device=probs.device) < counts[:, None]
            ids = torch.where(keep, ids[:, :width], router.num_experts)
            weights = torch.where(keep, values[:, :width], 0.0).to(logits.dtype)
            return logits, weights, ids

        return forward

    # Unchosen slots name expert `num_experts`. transformers' eager experts loop skips it; its CPU grouped_mm path
    # does not mask it reliably (its rows come back uninitialised: NaN losses seen), so eager routes here.
    config = model.config
    implementation = getattr(config, "_experts_implementation", None)
    config._experts_implementation = "eager"
    for router in routers:
        router.forward = forward_of(router)
    try:
        yield spend
    finally:
        config._experts_implementation = implementation
        for router in routers:
            del router.forward  # back to the class's own TopK forward


@torch.no_grad()
def measure_spend(model, rule: str, parameter: float, blocks: torch.Tensor) -> float:
    """Mean experts per token over layers when `model` reads `blocks` ([n, seq_len] token ids)."""
    with adaptive_routing(model, rule, parameter) as spend:
        for i in range(0, len(blocks), 32):
            model(input_ids=blocks[i:i + 32])
    return spend.experts_per_token


def calibrate(model, rule: str, target: float, blocks: torch.Tensor, iterations: int = 24) -> dict:
    """Bisect the rule's parameter until `model` spends `target` experts per token on `blocks` (the spend grows
    with p and with scale). Returns the parameter that came closest and the spend it reached."""
    low, high = _PARAMETER_RANGE[rule]
    best = None
    for _ in range(iterations):
        middle = (low + high) / 2
        reached = measure_spend(model, rule, middle, blocks)
        if best is None or abs(reached - target) < abs(best[1] - target):
            best = (middle, reached)
        if reached > target:
            high = middle
        else:
            low = middle
        if abs(reached - target) <= 2e-3 * target:
            break
    parameter, reached = best
    out = {"parameter": parameter, "calibrated_spend": reached, "target": target}
    if rule == "entropy":
        out["thresholds_nats_first"] = entropy_thresholds(parameter, 64)[:8]
    return out
