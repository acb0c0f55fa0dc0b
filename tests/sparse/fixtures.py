"""Shared helpers for the CSR tests: the shared-data skip and one tiny head trained once per test session.

Imported by tests/test_csr_*.py.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

from seqtopk.paths import shared_root
from seqtopk.testing.require import needs, shared_missing

HAS_SHARED_DATA = (shared_root() / "data" / "banking77" / "train.csv").is_file()
needs_shared_data = needs("shared_data", shared_missing("data", "banking77", "train.csv"))  # fails under CI
TINY_K = 8


@lru_cache(maxsize=1)
def scratch_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="seqtopk-csr-tests-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@lru_cache(maxsize=1)
def tiny_training_file() -> Path:
    """300 Banking77 train rows as a {"text", "label"} JSONL file (the --data FILE format)."""
    from seqtopk.sparse.data.readers import banking77_rows

    path = scratch_dir() / "banking77-300.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text, label in banking77_rows("train")[:300]:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@lru_cache(maxsize=1)
def tiny_head() -> Path:
    """A k=8 CSR head on the offline MiniLM, 60 real training steps on tiny_training_file()."""
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.csr.train import TrainConfig, train_head

    out = scratch_dir() / "tiny-head"
    config = TrainConfig(k=TINY_K, max_steps=60, batch_size=64, data=[str(tiny_training_file())])
    train_head(default_backbone(), out, config, progress=False)
    return out


@lru_cache(maxsize=1)
def tiny_finetuned_head() -> Path:
    """tiny_head's recipe plus 4 steps of end-to-end backbone fine-tuning: a folder with its own backbone weights."""
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.csr.train import TrainConfig, train_head

    out = scratch_dir() / "tiny-finetuned-head"
    config = TrainConfig(k=TINY_K, max_steps=60, batch_size=64, finetune_steps=4, finetune_batch_size=8, backbone_lr=1e-4,
                         data=[str(tiny_training_file())])
    train_head(default_backbone(), out, config, progress=False)
    return out
