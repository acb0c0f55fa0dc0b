"""One tiny SSR encoder trained once per test session (real steps on a slice of SciFact train), and a small
slice of SciFact documents and test queries. Imported by tests/sparse/test_ssr_*.py."""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from tests.sparse.fixtures import scratch_dir

TINY_SSR_K = 8
TINY_SSR_LATENTS = 512


@contextmanager
def own_token_cache():
    """Point $SEQTOPK_CACHE at a scratch folder: the tests encode their small slice themselves instead of
    loading a developer's full token cache (which can hold a whole corpus), so their cost stays fixed."""
    before = os.environ.get("SEQTOPK_CACHE")
    os.environ["SEQTOPK_CACHE"] = str(scratch_dir() / "ssr-cache")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SEQTOPK_CACHE", None)
        else:
            os.environ["SEQTOPK_CACHE"] = before


@lru_cache(maxsize=1)
def tiny_ssr() -> Path:
    """k=8 of 512 latents, 30 training steps on the first 96 SciFact train pairs."""
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.ssr.train import SSRTrainConfig, train_ssr

    out = scratch_dir() / "tiny-ssr"
    config = SSRTrainConfig(k=TINY_SSR_K, latents=TINY_SSR_LATENTS, max_steps=30, batch_pairs=16, max_pairs=96,
                            heldout_docs=16)
    train_ssr(default_backbone(), out, config, progress=False)
    return out


@lru_cache(maxsize=1)
def scifact_slice():
    """10 SciFact test queries, their judged documents and 30 others."""
    from seqtopk.sparse.ssr.evaluate import scifact_test

    return scifact_test().head(queries=10, docs=30)
