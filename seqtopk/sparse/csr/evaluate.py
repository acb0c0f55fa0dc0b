"""Evaluate heads and dense baselines with MTEB on the local tasks; one row of main scores per model."""

from __future__ import annotations

import json
from pathlib import Path

from seqtopk.sparse.backbone import CachedBackbone
from seqtopk.sparse.csr.folder import check_head_folder


def training_summary(head: Path) -> dict:
    path = Path(head) / "csr_training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate_heads(heads: list[Path], tasks: list[str], use_cache: bool = True) -> list[dict]:
    for head in heads:  # a missing or mismatched file fails here, named, before anything heavy is imported
        check_head_folder(head)
    from seqtopk.sparse.mteb.models import CSRHeadModel, run_tasks
    from seqtopk.sparse.mteb.tasks import local_tasks

    local_tasks(tasks)  # unknown task names fail here, before any model is loaded
    rows = []
    for head in heads:
        summary = training_summary(head)
        model = CSRHeadModel(head, CachedBackbone(head) if use_cache else None, name=f"seqtopk/{Path(head).name}")
        rows.append(
            {
                "model": str(head),
                "method": summary.get("method"),
                "k": summary.get("k", model.head.k),
                "dead_latent_fraction_heldout": summary.get("dead_latent_fraction_heldout"),
                "scores": run_tasks(model, local_tasks(tasks)),
            }
        )
    return rows


def evaluate_mrl(folder: Path, tasks: list[str]) -> dict:
    """MTEB row of an MRL reference folder (`seqtopk csr train --method mrl`): its backbone's embeddings from the
    cache (shared with the frozen backbone when it was not fine-tuned), then its linear head."""
    from seqtopk.sparse.mteb.models import LinearHeadModel, run_tasks
    from seqtopk.sparse.mteb.tasks import local_tasks

    summary = training_summary(folder)
    if summary.get("method") != "mrl":
        raise ValueError(f"{folder} is not an MRL reference folder (csr_training.json names method {summary.get('method')!r})")
    model = LinearHeadModel(CachedBackbone(folder), folder, name=f"seqtopk/{Path(folder).name}")
    return {"model": str(folder), "method": "mrl", "k": summary["k"], "dead_latent_fraction_heldout": None,
            "scores": run_tasks(model, local_tasks(tasks))}


def evaluate_dense(backbone: Path, tasks: list[str], dims: int | None = None) -> dict:
    from seqtopk.sparse.mteb.models import DenseBaselineModel, run_tasks
    from seqtopk.sparse.mteb.tasks import local_tasks

    model = DenseBaselineModel(CachedBackbone(backbone), dims)
    return {"model": str(backbone), "method": "dense" if dims is None else "dense-truncated", "k": dims, "scores": run_tasks(model, local_tasks(tasks))}
