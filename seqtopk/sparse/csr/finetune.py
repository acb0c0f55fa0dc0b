"""Stage 2 of training: backbone and head trained end to end on text batches (CSRv2's third ingredient).

The backbone and the head get their own learning rates: the backbone a small peak rate (`backbone_lr`) with
a linear warmup then a linear or cosine decay to zero, so the pre-trained weights are not thrown off by the
first, largest gradients of a head that meets moving inputs; the head, already trained in stage 1, a constant
rate (`finetune_head_lr`). Only the contrastive term reaches the backbone (seqtopk.sparse.coding.losses.batch_loss).
"""

from __future__ import annotations

import math
import time
from pathlib import Path


def backbone_rate(step: int, total: int, warmup: float, schedule: str) -> float:
    """Multiplier of the backbone's peak rate at `step` (0-based) of `total`: linear warmup over the first
    `warmup` fraction, then `schedule` (linear or cosine to 0, or constant)."""
    warmup_steps = math.ceil(warmup * total)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def finetune(model, head, split, config, rng, out: Path, backbone: Path, saved: dict | None,
             deadline: float | None, progress: bool, history: list[dict]):
    """Train `model` (backbone modules + `head`) end to end for config.finetune_steps steps.

    Returns the loss history (stage 1's `history`, then this stage's), or the paused() record when
    `deadline` (time.monotonic) passed first; a checkpoint is written every config.checkpoint_every steps
    (and at the pause).
    """
    import torch
    from tqdm.auto import tqdm

    from seqtopk.sparse.csr import checkpoint as ckpt
    from seqtopk.sparse.coding.losses import batch_loss
    from seqtopk.sparse.data.batches import training_batches

    dense = list(model)[:-1]
    total = config.finetune_steps
    optimiser = torch.optim.AdamW(
        [
            {"params": [p for m in dense for p in m.parameters()], "lr": config.backbone_lr},
            {"params": list(head.parameters()), "lr": config.finetune_head_lr},
        ]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, [lambda step: backbone_rate(step, total, config.backbone_warmup, config.backbone_schedule), lambda step: 1.0]
    )
    done, history = 0, list(history)
    if saved is not None and saved["stage"] == "finetune":
        done, history = saved["step"], saved["history"]
        for module, state in zip(dense, saved["dense"]):
            module.load_state_dict(state)
        head.load_state_dict(saved["head"])
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
    head.k = config.k
    model.train()
    texts = split.texts
    bar = tqdm(total=total, initial=done, desc=f"backbone fine-tuning {config.method} k={config.k}", disable=not progress)
    for step, (anchors, positives, labels) in enumerate(training_batches(split, config.finetune_batch_size, total, rng), start=1):
        if step <= done:  # replayed: the batches a resumed run already trained on
            continue
        features = model.preprocess([texts[i] for i in anchors] + [texts[i] for i in positives])
        for module in dense:
            features = module(features)
        loss, parts = batch_loss(head, features["sentence_embedding"], len(anchors), labels, config.k, config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        if step == 1 or step % 10 == 0 or step == total:
            history.append({"step": config.max_steps + step, "k": config.k, "loss": float(loss.detach()),
                            "backbone_lr": optimiser.param_groups[0]["lr"], **parts})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{optimiser.param_groups[0]['lr']:.1e}")
        bar.update(1)
        stopping = deadline is not None and time.monotonic() > deadline and step < total
        if step % config.checkpoint_every == 0 or stopping or step == total:
            ckpt.save(out, config, backbone, {
                "stage": "finetune", "step": step, "dense": [m.state_dict() for m in dense], "head": head.state_dict(),
                "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "history": history})
        if stopping:
            bar.close()
            model.eval()
            return ckpt.paused(out, "finetune", step, total)
    bar.close()
    model.eval()
    return history


def encode_heldout(model, texts: list[str], out: Path, deadline: float | None, progress: bool, slice_size: int = 512):
    """The fine-tuned backbone's embeddings of the held-out texts, or None when `deadline` passed first.

    They go through the embedding cache (seqtopk.sparse.backbone.CachedBackbone) of the fine-tuned backbone,
    saved for that in the checkpoint folder: a paused run keeps the slices it encoded, and the saved encoder
    folder has the same fingerprint, so its evaluation reuses them (SciFact's held-out texts are corpus
    documents).
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from tqdm.auto import tqdm

    from seqtopk.sparse.backbone import CachedBackbone
    from seqtopk.sparse.csr.checkpoint import checkpoint_dir

    dense = SentenceTransformer(modules=list(model)[:-1], device="cpu")
    folder = checkpoint_dir(out) / "backbone"
    dense.save(str(folder))
    cached = CachedBackbone(folder, model=dense)
    starts = range(0, len(texts), slice_size)
    for start in tqdm(starts, desc="held-out texts through the fine-tuned backbone", unit="slice", disable=not progress):
        cached.encode(texts[start:start + slice_size])
        if deadline is not None and time.monotonic() > deadline and start + slice_size < len(texts):
            return None
    if not texts:
        return torch.zeros(0, model[-1].input_dim)
    return torch.from_numpy(cached.encode(texts))
