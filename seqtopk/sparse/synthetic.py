"""Synthetic sparse corpora with the statistics of real codes, for search benchmarks at any size.

A trained head's latent firing frequencies and per-latent value distributions are measured on real codes
(`CodeStatistics.from_codes`) and reproduced for millions of rows (`synthetic_corpus`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqtopk.sparse.index.rows import SparseRows


@dataclass
class CodeStatistics:
    """How often each latent fires and which values it takes, measured on real codes."""

    firing_rate: np.ndarray  # (dim,), fraction of rows in which the latent is non-zero
    value_indptr: np.ndarray  # per-latent slices into `values`
    values: np.ndarray  # observed non-zero values, grouped by latent
    k: int  # active latents per row (the largest row length seen)

    @classmethod
    def from_codes(cls, codes: SparseRows) -> "CodeStatistics":
        order = np.argsort(codes.indices, kind="stable")
        counts = np.bincount(codes.indices, minlength=codes.dim)
        value_indptr = np.zeros(codes.dim + 1, dtype=np.int64)
        np.cumsum(counts, out=value_indptr[1:])
        k = int(np.diff(codes.indptr).max()) if codes.n_rows else 0
        return cls(counts / max(codes.n_rows, 1), value_indptr, codes.values[order], k)


def synthetic_corpus(stats: CodeStatistics, n_docs: int, seed: int = 0, chunk: int = 50_000) -> SparseRows:
    """n_docs rows of exactly `stats.k` latents each, drawn without replacement with probability proportional
    to the firing rate (Gumbel top-k), each value drawn from the values that latent took on real text."""
    rng = np.random.default_rng(seed)
    k, dim = stats.k, len(stats.firing_rate)
    alive = np.flatnonzero(stats.firing_rate > 0)
    if len(alive) < k:
        raise ValueError(f"only {len(alive)} latents ever fire, fewer than k={k}")
    log_rate = np.log(stats.firing_rate[alive])
    indices = np.empty((n_docs, k), dtype=np.int32)
    for start in range(0, n_docs, chunk):
        rows = min(chunk, n_docs - start)
        keys = log_rate + rng.gumbel(size=(rows, len(alive)))
        picked = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        indices[start : start + rows] = np.sort(alive[picked], axis=1)
    flat = indices.ravel()
    counts = np.diff(stats.value_indptr)[flat]
    values = stats.values[stats.value_indptr[flat] + (rng.random(len(flat)) * counts).astype(np.int64)]
    return SparseRows(np.arange(0, n_docs * k + 1, k, dtype=np.int64), flat, values.astype(np.float32), dim)
