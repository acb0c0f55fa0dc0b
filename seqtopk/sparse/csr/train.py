"""Fit a CSR / CSRv2 head on a dense backbone and save it as a SparseEncoder folder.

Stage 1 trains the head on cached backbone embeddings (seconds to minutes on a CPU). Stage 2, CSRv2's
backbone fine-tuning, trains backbone and head end to end for `finetune_steps` more steps. Both stages
use the same loss: k and 4k reconstruction, AuxK on dead latents, and a contrastive term on the codes
(InfoNCE over anchor/positive pairs for CSR; supervised contrastive over shared labels for CSRv2).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from seqtopk.sparse.data.batches import Split, split_heldout, training_batches
from seqtopk.sparse.data.readers import load_training_sets
from seqtopk.sparse.csr.losses import LossWeights
from seqtopk.sparse.index.atomic import replace_folder, staging_folder

METHODS = ("csr", "csrv2")


@dataclass
class TrainConfig:
    """Everything that decides a training run. `method` picks the defaults of the CSRv2-only options."""

    k: int
    method: str = "csr"
    hidden_multiple: int = 4  # hidden size = this x backbone dimension (published: 4)
    max_steps: int = 2000
    batch_size: int = 256  # pairs per step on cached embeddings
    lr: float = 1e-3
    k_init: int | None = None  # CSRv2 annealing start; default 32 x k, capped at hidden/4
    anneal_fraction: float = 0.7
    supervised: bool | None = None  # supervised contrastive with labels (CSRv2 default)
    finetune_steps: int = 0  # CSRv2 backbone fine-tuning steps after the head is trained
    finetune_batch_size: int = 32
    finetune_lr: float = 2e-5
    k_aux: int = 512
    dead_threshold: int = 30
    heldout_fraction: float = 0.05
    seed: int = 0
    data: list[str] = field(default_factory=list)  # names or JSONL paths; empty = every shared train split
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.supervised is None:
            self.supervised = self.method == "csrv2"
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.max_steps < 1 or self.batch_size < 2:
            raise ValueError("max_steps must be >= 1 and batch_size >= 2")
        if self.finetune_steps < 0:
            raise ValueError("finetune_steps must be >= 0")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError("heldout_fraction must be in (0, 0.5)")

    def hidden_dim(self, input_dim: int) -> int:
        hidden = self.hidden_multiple * input_dim
        if self.k > hidden:
            raise ValueError(f"k={self.k} exceeds the hidden size {hidden}; lower k or raise hidden_multiple")
        return hidden

    def k_start(self, hidden: int) -> int:
        """First k of the CSRv2 anneal: k_init (default 32 x k), capped at hidden/4, never below k.

        Starting at the cap for every k (384 for k=2 at hidden 1536) left 74% of latents dead on held-out
        text and scored worse on the dev splits than starting at 64; 32 x k keeps that ratio for every k.
        """
        if self.method != "csrv2":
            return self.k
        return max(self.k, min(self.k_init or 32 * self.k, hidden // 4))


def k_at_step(step: int, total_steps: int, k_start: int, k_final: int, anneal_fraction: float = 0.7) -> int:
    """Linear anneal from k_start to k_final over the first `anneal_fraction` of the steps, then flat."""
    anneal_steps = max(1, math.ceil(anneal_fraction * total_steps))
    if step >= anneal_steps:
        return k_final
    return int(round(k_start + (k_final - k_start) * step / anneal_steps))


# ----------------------------------------------------------------------------------------------------
# Loss on one batch


def batch_loss(head, x, n_pairs: int, labels, k: int, config: TrainConfig):
    """Total loss and its parts for a batch whose rows are [anchors; positives] dense embeddings.

    Reconstruction sees the embeddings detached, so when the backbone is fine-tuned only the contrastive
    term reaches it; otherwise the backbone could make its embeddings easier to reconstruct from k
    latents at the expense of what they mean.
    """
    import torch

    from seqtopk.sparse.csr.losses import info_nce, reconstruction_terms, supervised_contrastive
    from seqtopk.sparse.csr.sparse_coding import topk_relu

    head.k = k
    target = x.detach()
    features = head({"sentence_embedding": target})
    codes = features["sentence_embedding"]
    aux = features["csr_codes_aux"]
    parts = reconstruction_terms(
        target,
        head.decode_codes(codes),
        head.decode_codes(features["csr_codes_4k"]),
        None if aux is None else aux @ head.encoder.weight,
    )
    if x.requires_grad:  # backbone fine-tuning: the same codes, computed from the live embeddings
        codes = topk_relu(head.pre_activations(x), k)
    w = config.weights
    if config.supervised:
        both = torch.as_tensor(np.concatenate([labels, labels]), device=codes.device)
        parts["contrastive"] = supervised_contrastive(codes, both, w.supcon_temperature)
    else:
        parts["contrastive"] = info_nce(codes[:n_pairs], codes[n_pairs:], w.temperature)
    total = parts["mse_k"] + w.four_k * parts["mse_4k"] + w.aux * parts["auxk"] + w.contrastive * parts["contrastive"]
    return total, {name: float(value.detach()) for name, value in parts.items()}


# ----------------------------------------------------------------------------------------------------
# The run


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")


def train_head(backbone: Path, out: Path, config: TrainConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Train a head, save the SparseEncoder folder at `out`, and return the run's summary (also saved)."""
    import torch
    from tqdm.auto import tqdm

    from seqtopk.sparse.backbone import CachedBackbone, load_backbone
    from seqtopk.sparse.csr.sparse_coding import dead_latent_fraction
    from seqtopk.sparse.sae import TopKSAE

    backbone, out = Path(backbone), Path(out)
    _check_out(out, overwrite)  # validate everything before any work or any write
    if not (backbone / "modules.json").is_file():
        raise FileNotFoundError(f"--backbone {backbone} is not a sentence-transformers model folder (no modules.json)")
    sets = load_training_sets(config.data or None)

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    split = split_heldout(sets, config.heldout_fraction, rng)
    texts = split.texts

    cached = CachedBackbone(backbone)
    embeddings = torch.from_numpy(cached.encode(texts + split.heldout_texts, desc="backbone embeddings"))
    train_x, heldout_x = embeddings[: len(texts)], embeddings[len(texts) :]
    input_dim = train_x.shape[1]
    hidden = config.hidden_dim(input_dim)
    k_start = config.k_start(hidden)

    head = TopKSAE(input_dim, hidden, config.k, config.k_aux, False, config.dead_threshold)
    head.initialise(train_x.mean(dim=0))
    head.train()
    optimiser = torch.optim.Adam(head.parameters(), lr=config.lr)
    history = []
    bar = tqdm(total=config.max_steps, desc=f"{config.method} head k={config.k}", disable=not progress)
    batches = training_batches(split, config.batch_size, config.max_steps, rng)
    for step, (anchors, positives, labels) in enumerate(batches, start=1):
        k = k_at_step(step - 1, config.max_steps, k_start, config.k, config.anneal_fraction)
        x = torch.cat([train_x[anchors], train_x[positives]])
        loss, parts = batch_loss(head, x, len(anchors), labels, k, config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == config.max_steps:
            history.append({"step": step, "k": k, "loss": float(loss.detach()), **parts})
            bar.set_postfix(k=k, loss=f"{float(loss.detach()):.3f}", dead=int(head.dead_mask().sum()))
        bar.update(1)
    bar.close()
    head.k = config.k

    model = _assemble(load_backbone(backbone), head)
    if config.finetune_steps:
        history += _finetune(model, head, split, config, rng, progress)
        heldout_x = _encode_dense(model, split.heldout_texts)

    head.eval()
    with torch.no_grad():
        heldout_codes = head({"sentence_embedding": heldout_x})["sentence_embedding"]
    summary = {
        "method": config.method,
        "k": config.k,
        "hidden_dim": hidden,
        "backbone": str(backbone),
        "backbone_finetuned": bool(config.finetune_steps),
        "train_texts": len(texts),
        "heldout_texts": len(split.heldout_texts),
        "dead_latent_fraction_heldout": dead_latent_fraction(heldout_codes),
        "mean_active_heldout": float((heldout_codes > 0).sum(dim=1).float().mean()),
        "final": history[-1] if history else {},
        "config": {**asdict(config), "k_start": k_start},
    }
    save_head(model, head, out, summary, overwrite)
    return summary


def _assemble(backbone, head):
    """Backbone modules + the head in one SparseEncoder (cosine: what the contrastive terms train)."""
    from sentence_transformers import SparseEncoder

    return SparseEncoder(modules=[*backbone, head], device="cpu", similarity_fn_name="cosine")


def _encode_dense(model, texts: list[str]):
    """Backbone embeddings through a (fine-tuned) SparseEncoder's dense modules (length-sorted batches)."""
    import torch
    from sentence_transformers import SentenceTransformer

    dense = SentenceTransformer(modules=list(model)[:-1], device="cpu")
    return dense.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False).float() if texts else torch.zeros(0, model[-1].input_dim)


def _finetune(model, head, split: Split, config: TrainConfig, rng, progress: bool) -> list[dict]:
    """CSRv2 stage 2: backbone and head trained end to end on text batches."""
    import torch
    from tqdm.auto import tqdm

    dense = list(model)[:-1]
    model.train()
    optimiser = torch.optim.AdamW(
        [
            {"params": [p for m in dense for p in m.parameters()], "lr": config.finetune_lr},
            {"params": head.parameters(), "lr": config.finetune_lr * 10},
        ]
    )
    texts = split.texts
    history = []
    bar = tqdm(total=config.finetune_steps, desc=f"backbone fine-tuning k={config.k}", disable=not progress)
    batches = training_batches(split, config.finetune_batch_size, config.finetune_steps, rng)
    for step, (anchors, positives, labels) in enumerate(batches, start=1):
        features = model.preprocess([texts[i] for i in anchors] + [texts[i] for i in positives])
        for module in dense:
            features = module(features)
        loss, parts = batch_loss(head, features["sentence_embedding"], len(anchors), labels, config.k, config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 10 == 0 or step == config.finetune_steps:
            history.append({"step": config.max_steps + step, "k": config.k, "loss": float(loss.detach()), **parts})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    return history


def save_head(model, head, out: Path, summary: dict, overwrite: bool = False) -> None:
    """Write the SparseEncoder folder (plain upstream head module) plus the vLLM fields, atomically."""
    from seqtopk.sparse.csr.serving_config import write_serving_fields

    out = Path(out)
    _check_out(out, overwrite)
    modules = list(model)
    modules[-1] = head.to_upstream().eval()
    from sentence_transformers import SparseEncoder

    final = SparseEncoder(modules=modules, device="cpu", similarity_fn_name="cosine")
    # Written whole beside `out`, then moved in (seqtopk.sparse.index.atomic): a failed or interrupted save
    # leaves no half folder that loads, and an existing `out` stays until the new one is complete on disk.
    staging = staging_folder(out)
    try:
        final.save(str(staging))
        write_serving_fields(staging)
        (staging / "csr_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        replace_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
