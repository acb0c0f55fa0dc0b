"""The demo model and what the demo measures with it: does SeqTopK give more experts to harder tokens?

The package ships a small MoE language model trained by `evals/train_demo_model.py` (OLMoE-style, 16 experts,
top-2, byte-level, on tinyshakespeare: pretrained with TopK, then fine-tuned with SeqTopK), in `model/` next
to this file, with a card (`seqtopk_demo.json`: how it was trained, the SeqTopK settings it was fine-tuned
with, and the held-out figures measured when it was written).

`held_out_figures` measures, on text the model never trained on, the held-out loss under stock TopK and under
SeqTopK, and how strongly experts per token follow token difficulty: the Spearman correlation between a
token's experts (mean over layers) and its loss (the surprisal of the next token, which the token's own
forward pass predicts), and with its router entropy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MODEL_DIR = Path(__file__).resolve().parent / "model"
CARD = "seqtopk_demo.json"
BLOCK = 128  # the demo model's context length


def card(path: Path = MODEL_DIR) -> dict:
    """The model card of a demo model folder (empty for other checkpoints)."""
    file = Path(path) / CARD
    return json.loads(file.read_text()) if file.is_file() else {}


def load(path: Path = MODEL_DIR):
    """(model, tokenizer) in float32 on the CPU, unpatched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1 with ties given their average rank (as Spearman's rho needs)."""
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[1:] = sorted_vals[1:] != sorted_vals[:-1]
    group = new_group.cumsum(0) - 1
    positions = torch.arange(1, len(values) + 1, dtype=torch.float64)
    mean_position = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    mean_position /= torch.bincount(group).double()
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = mean_position[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = rank(a.double()), rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@dataclass
class TokenView:
    """One text as the model sees it: per-token experts per layer, next-token loss, router entropy."""

    ids: torch.Tensor  # [T]
    experts: torch.Tensor  # [layers, T] experts each token took in each layer
    loss: torch.Tensor  # [T-1] surprisal of token t+1 given tokens <= t (nats)
    entropy: torch.Tensor  # [T] router entropy, mean over layers (nats)


@torch.no_grad()
def token_view(model, ids: torch.Tensor) -> TokenView:
    """Run one sequence [T] through a (patched or stock) model and read it token by token."""
    from contextlib import nullcontext

    import seqtopk

    patched = seqtopk.is_patched(model)
    with seqtopk.trace_routing(model) if patched else nullcontext() as trace:
        out = model(input_ids=ids.unsqueeze(0), output_router_logits=True)
    logits = out.logits[0].float()
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
    router = torch.stack([r.float().view(-1, r.shape[-1])[: len(ids)] for r in out.router_logits])  # [L, T, E]
    probs = router.softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0)
    if patched:
        experts = trace.experts_per_token()[:, 0]
    else:
        experts = torch.full((len(out.router_logits), len(ids)), model.config.num_experts_per_tok)
    return TokenView(ids=ids, experts=experts, loss=loss, entropy=entropy)


@dataclass
class HeldOut:
    """Held-out figures of one model: stock TopK vs SeqTopK on the same tokens."""

    tokens: int  # tokens whose loss was measured
    topk_loss: float
    seqtopk_loss: float
    seqtopk_experts_per_token: float
    spearman_experts_loss: float  # SeqTopK: experts per token (mean over layers) vs next-token loss
    spearman_experts_entropy: float  # SeqTopK: experts per token vs router entropy
    topk_at_loss: dict = field(default_factory=dict)  # stock TopK at budgets below the model's top_k: {k: loss}

    def as_dict(self) -> dict:
        return asdict(self)


def held_out_figures(model, settings: dict, ids: torch.Tensor, blocks: int = 16,
                     reduced: tuple[int, ...] = ()) -> HeldOut:
    """Measure on `blocks` consecutive windows of BLOCK tokens of held-out ids; the model is left unpatched.
    reduced: budgets at which stock TopK is measured too (see `topk_budgets_around`)."""
    import seqtopk

    windows = ids[: blocks * BLOCK].view(-1, BLOCK)
    seqtopk.unpatch(model) if seqtopk.is_patched(model) else None
    stock = [token_view(model, w) for w in windows]
    topk_at_loss = {}
    for k in reduced:
        with seqtopk.topk_at(model, k):
            topk_at_loss[k] = float(torch.cat([token_view(model, w).loss for w in windows]).mean())
    with seqtopk.patched(model, **settings):
        routed = [token_view(model, w) for w in windows]
    experts = torch.cat([v.experts.float().mean(0)[:-1] for v in routed])  # tokens that predict a next token
    loss = torch.cat([v.loss for v in routed])
    entropy = torch.cat([v.entropy[:-1] for v in routed])
    return HeldOut(tokens=len(loss), topk_loss=float(torch.cat([v.loss for v in stock]).mean()),
                   seqtopk_loss=float(loss.mean()),
                   seqtopk_experts_per_token=float(torch.cat([v.experts.float().mean(0) for v in routed]).mean()),
                   spearman_experts_loss=spearman(experts, loss), spearman_experts_entropy=spearman(experts, entropy),
                   topk_at_loss=topk_at_loss)


def topk_budgets_around(k, top_k: int) -> tuple[int, ...]:
    """The stock TopK budgets a SeqTopK budget k below the model's top_k is compared with (SPEC section 5):
    k itself when whole, else the two whole numbers around it (those >= 1); () when k is not below top_k."""
    if k >= top_k:
        return ()
    low, high = math.floor(k), math.ceil(k)
    return tuple(sorted({b for b in (low, high) if b >= 1}))


def held_out_ids(tokenizer, text: str) -> torch.Tensor:
    """The held-out part of a training text: its last 10% (what evals/train_demo_model.py never trains on)."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    return ids[int(len(ids) * 0.9):]
