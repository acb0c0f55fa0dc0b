"""Fit a CSR / CSRv2 head (or the MRL-32 dense reference) on a dense backbone and save it as one folder.

Stage 1 trains the head on cached backbone embeddings (seconds to minutes on a CPU). Stage 2, backbone
fine-tuning (`finetune_steps`, seqtopk.sparse.csr.finetune), trains backbone and head end to end on text
batches, the backbone with its own learning rate and warmup + decay schedule. Both stages use the same loss:
k and 4k reconstruction, AuxK on dead latents, and a contrastive term on the codes (InfoNCE over
anchor/positive pairs for CSR; supervised contrastive over shared labels for CSRv2). A run writes a
checkpoint every `checkpoint_every` steps beside its output folder and can stop (`time_limit_s`) and go on
from it (`resume=True`); seqtopk.sparse.csr.checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from seqtopk.sparse.data.batches import split_heldout, training_batches
from seqtopk.sparse.data.readers import load_training_sets
from seqtopk.sparse.coding.losses import LossWeights, batch_loss  # noqa: F401  (batch_loss: part of a run)
from seqtopk.sparse.index.atomic import replace_folder, staging_folder

METHODS = ("csr", "csrv2", "mrl")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything that decides a training run. `method` picks the defaults of the CSRv2-only options.

    method="mrl" trains the dense reference: a linear k-dimensional head (no top-k, no ReLU) with the same
    data and loss as CSRv2 (tied reconstruction, supervised contrastive), saved as a SentenceTransformer.
    """

    k: int
    method: str = "csr"
    hidden_multiple: int = 4  # hidden size = this x backbone dimension (published: 4)
    max_steps: int = 2000
    batch_size: int = 256  # pairs per step on cached embeddings
    lr: float = 1e-3
    k_init: int | None = None  # CSRv2 annealing start; default 32 x k, capped at hidden/4
    anneal_fraction: float = 0.7
    supervised: bool | None = None  # supervised contrastive with labels (CSRv2 and MRL default)
    finetune_steps: int = 0  # end-to-end backbone fine-tuning steps after the head is trained
    finetune_batch_size: int = 32  # pairs per fine-tuning step (texts through the backbone: 2x this)
    backbone_lr: float = 2e-5  # peak learning rate of the backbone (AdamW)
    backbone_warmup: float = 0.1  # fraction of the fine-tuning steps that ramp the backbone's rate up from 0
    backbone_schedule: str = "linear"  # after warmup: linear or cosine decay to 0, or constant
    finetune_head_lr: float = 1e-4  # the head's learning rate while the backbone trains (constant)
    checkpoint_every: int = 100  # steps between checkpoints, in either stage
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
            self.supervised = self.method in ("csrv2", "mrl")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.max_steps < 1 or self.batch_size < 2:
            raise ValueError("max_steps must be >= 1 and batch_size >= 2")
        if self.finetune_steps < 0 or self.finetune_batch_size < 2:
            raise ValueError("finetune_steps must be >= 0 and finetune_batch_size >= 2")
        if self.backbone_schedule not in SCHEDULES:
            raise ValueError(f"unknown backbone_schedule {self.backbone_schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.backbone_warmup < 1.0 or self.backbone_lr <= 0 or self.finetune_head_lr <= 0:
            raise ValueError("backbone_warmup must be in [0, 1) and the learning rates positive")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError("heldout_fraction must be in (0, 0.5)")

    def hidden_dim(self, input_dim: int) -> int:
        if self.method == "mrl":
            if self.k > input_dim:
                raise ValueError(f"an MRL head of {self.k} dims cannot exceed the backbone's {input_dim}")
            return self.k
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


# ----------------------------------------------------------------------------------------------------
# The run


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")


def new_head(config: TrainConfig, input_dim: int):
    from seqtopk.sparse.csr.dense_head import LinearHead
    from seqtopk.sparse.coding.sae import TopKSAE

    hidden = config.hidden_dim(input_dim)
    if config.method == "mrl":
        return LinearHead(input_dim, hidden)
    return TopKSAE(input_dim, hidden, config.k, config.k_aux, False, config.dead_threshold)


def train_head(backbone: Path, out: Path, config: TrainConfig, overwrite: bool = False, progress: bool = True,
               resume: bool = False, time_limit_s: float | None = None) -> dict:
    """Train a head, save the folder at `out`, and return the run's summary (also saved).

    With `time_limit_s`, the run stops at the first step past the limit, writes its checkpoint and returns
    {"paused": True, ...}; calling again with resume=True goes on from there, and gives the same folder as
    one uninterrupted run.
    """
    import torch
    from tqdm.auto import tqdm

    from seqtopk.sparse.backbone import CachedBackbone, load_backbone
    from seqtopk.sparse.csr import checkpoint as ckpt
    from seqtopk.sparse.csr.finetune import encode_heldout, finetune
    from seqtopk.sparse.coding.sparse_coding import dead_latent_fraction

    backbone, out = Path(backbone), Path(out)
    _check_out(out, overwrite)  # validate everything before any work or any write
    if not (backbone / "modules.json").is_file():
        raise FileNotFoundError(f"--backbone {backbone} is not a sentence-transformers model folder (no modules.json)")
    saved = ckpt.find(out, config, backbone, resume)
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
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

    head = new_head(config, input_dim)
    head.initialise(train_x.mean(dim=0))
    head.train()
    optimiser = torch.optim.Adam(head.parameters(), lr=config.lr)
    history: list[dict] = []
    done = 0
    if saved is not None and saved["stage"] == "head":
        done, history = saved["step"], saved["history"]
        head.load_state_dict(saved["head"])
        optimiser.load_state_dict(saved["optimiser"])
        torch.set_rng_state(saved["torch_rng"])
    in_stage_one = saved is None or saved["stage"] == "head"
    # The batches are drawn from `rng` in order; a resumed run draws (and skips) the ones already trained on,
    # so it sees the same batches as one uninterrupted run.
    batches = training_batches(split, config.batch_size, config.max_steps, rng)
    desc = f"{config.method} head k={config.k}"
    bar = tqdm(total=config.max_steps, initial=done if in_stage_one else config.max_steps, desc=desc, disable=not progress)
    for step, (anchors, positives, labels) in enumerate(batches, start=1):
        if not in_stage_one or step <= done:
            continue
        k = k_at_step(step - 1, config.max_steps, k_start, config.k, config.anneal_fraction)
        x = torch.cat([train_x[anchors], train_x[positives]])
        loss, parts = batch_loss(head, x, len(anchors), labels, k, config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step == 1 or step % 50 == 0 or step == config.max_steps:
            history.append({"step": step, "k": k, "loss": float(loss.detach()), **parts})
        dead = 0 if getattr(head, "is_dense", False) else int(head.dead_mask().sum())  # (a dense head has none)
        bar.set_postfix(k=k, loss=f"{float(loss.detach()):.3f}", dead=dead)
        bar.update(1)
        stopping = deadline is not None and time.monotonic() > deadline and step < config.max_steps
        if step % config.checkpoint_every == 0 or stopping or (step == config.max_steps and config.finetune_steps):
            ckpt.save(out, config, backbone, {"stage": "head", "step": step, "head": head.state_dict(),
                                               "optimiser": optimiser.state_dict(), "torch_rng": torch.get_rng_state(),
                                               "history": history})
        if stopping:
            bar.close()
            return ckpt.paused(out, "head", step, config.max_steps)
    bar.close()
    head.k = config.k

    model = _assemble(load_backbone(backbone), head)
    if config.finetune_steps:
        finished = finetune(model, head, split, config, rng, out, backbone, saved, deadline, progress, history)
        if isinstance(finished, dict):  # paused: the checkpoint is written
            return finished
        history = finished
        heldout_x = encode_heldout(model, split.heldout_texts, out, deadline, progress)
        if heldout_x is None:
            return ckpt.paused(out, "held-out encoding", config.finetune_steps, config.finetune_steps)

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
        "dead_latent_fraction_heldout": dead_latent_fraction(heldout_codes) if config.method != "mrl" else None,
        "mean_active_heldout": float((heldout_codes != 0).sum(dim=1).float().mean()),
        "final": history[-1] if history else {},
        "history": history,
        "config": {**asdict(config), "k_start": k_start},
    }
    save_head(model, head, out, summary, overwrite)
    ckpt.remove(out)
    return summary


def _assemble(backbone, head):
    """Backbone modules + the head in one model (cosine: what the contrastive terms train)."""
    from sentence_transformers import SentenceTransformer, SparseEncoder

    kind = SentenceTransformer if getattr(head, "is_dense", False) else SparseEncoder
    return kind(modules=[*backbone, head], device="cpu", similarity_fn_name="cosine")


def save_head(model, head, out: Path, summary: dict, overwrite: bool = False) -> None:
    """Write the folder (plain upstream modules, the backbone's weights as trained) plus the vLLM fields,
    atomically. A sparse head gives a SparseEncoder folder, the MRL head a SentenceTransformer folder."""
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from seqtopk.sparse.csr.serving_config import write_serving_fields

    out = Path(out)
    _check_out(out, overwrite)
    modules = list(model)
    modules[-1] = head.to_upstream().eval()
    dense = getattr(head, "is_dense", False)
    final = (SentenceTransformer if dense else SparseEncoder)(modules=modules, device="cpu", similarity_fn_name="cosine")
    # Written whole beside `out`, then moved in (seqtopk.sparse.index.atomic): a failed or interrupted save
    # leaves no half folder that loads, and an existing `out` stays until the new one is complete on disk.
    staging = staging_folder(out)
    try:
        final.save(str(staging))
        if not dense:
            write_serving_fields(staging)
        (staging / "csr_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        replace_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
