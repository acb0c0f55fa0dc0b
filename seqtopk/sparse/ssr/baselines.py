"""Late-interaction baselines that share SSR's backbone: exact dense MaxSim, and a k-means centroid index.

The k-means index is PLAID/ColBERTv1's candidate generation: faiss k-means over all document token vectors
(spherical, i.e. cosine), token rows listed by their nearest centroid, each query token probes its `nprobe`
nearest centroids, and every document with a token in a probed list is scored by exact dense MaxSim. Unlike
PLAID it keeps full-precision token vectors (no residual compression), so its scores are exact.
"""

from __future__ import annotations

import time

import numpy as np


def dense_maxsim_scores(q: np.ndarray, doc_vectors: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Exact MaxSim of one query's token vectors against documents laid out by `starts` (each document's first
    row). A document with no tokens (all punctuation, say) scores 0, as it does in the sparse index."""
    sims = doc_vectors @ q.T  # (tokens, query tokens)
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, len(sims)))
    scores = np.zeros(len(starts), dtype=sims.dtype)
    # reduceat only over documents that have rows: an empty document's start would be out of range (last
    # document) or would take its neighbour's first row (any other).
    has_rows = lengths > 0
    if has_rows.any():
        scores[has_rows] = np.maximum.reduceat(sims, starts[has_rows], axis=0).sum(axis=1)
    return scores


class KMeansIndex:
    """faiss k-means centroids; token rows listed by centroid; exact dense MaxSim on probed candidates."""

    def __init__(self, doc_vectors: np.ndarray, doc_offsets: np.ndarray, n_centroids: int, niter: int, seed: int = 0):
        import faiss

        self.vectors, self.offsets = doc_vectors, doc_offsets
        self.row_doc = np.repeat(np.arange(len(doc_offsets) - 1), np.diff(doc_offsets))
        start = time.perf_counter()
        kmeans = faiss.Kmeans(doc_vectors.shape[1], n_centroids, niter=niter, seed=seed, spherical=True, verbose=False)
        kmeans.train(doc_vectors)
        self.train_s = time.perf_counter() - start
        self.centroids = faiss.IndexFlatIP(doc_vectors.shape[1])
        self.centroids.add(kmeans.centroids)
        _, assign = self.centroids.search(doc_vectors, 1)
        order = np.argsort(assign[:, 0], kind="stable")
        self.list_rows = order.astype(np.int32)
        self.list_indptr = np.zeros(n_centroids + 1, np.int64)
        np.cumsum(np.bincount(assign[:, 0], minlength=n_centroids), out=self.list_indptr[1:])
        self.build_s = time.perf_counter() - start
        # Full-precision vectors (for exact MaxSim), centroids and the lists; PLAID would compress residuals.
        self.nbytes = int(doc_vectors.nbytes + kmeans.centroids.nbytes + self.list_rows.nbytes + self.list_indptr.nbytes)

    def search(self, q: np.ndarray, k: int, nprobe: int):
        _, probed = self.centroids.search(q, nprobe)
        rows = np.concatenate([self.list_rows[self.list_indptr[c]:self.list_indptr[c + 1]] for c in np.unique(probed)])
        candidates = np.unique(self.row_doc[rows])
        lengths = self.offsets[candidates + 1] - self.offsets[candidates]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gather = np.repeat(self.offsets[candidates] - starts, lengths) + np.arange(int(lengths.sum()))
        scores = dense_maxsim_scores(q, self.vectors[gather], starts)
        best = np.argpartition(-scores, min(k, len(scores)) - 1)[:k] if len(scores) > k else np.arange(len(scores))
        best = best[np.argsort(-scores[best], kind="stable")]
        return candidates[best], scores[best]
