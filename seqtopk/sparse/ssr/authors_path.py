"""What the SSR authors' index path computes, kept to show that it is not MaxSim (SPEC §3).

Their search takes, per query token, the max over (latent, document token) of the single product
q_i[l] * d_j[l], dropping the sum over the latents q_i and d_j share. For non-negative codes that is a
lower bound of max_j <q_i, d_j>, equal only when the best token shares a single latent with the query
token. Their test compared two copies of this approximation, so it passed. Never used for search here.
"""

from __future__ import annotations

import numpy as np

from seqtopk.sparse.index.multivector import MultiVectorIndex
from seqtopk.sparse.index.rows import SparseRows


def single_product_scores(index: MultiVectorIndex, query: SparseRows) -> np.ndarray:
    """sum_i max over (l, j) of q_i[l] * d_j[l], per document (n_docs,), from the posting lists."""
    p = index.postings
    scores = np.zeros(index.n_docs)
    for i in range(query.n_rows):
        best = np.full(index.n_docs, -np.inf)
        for latent, weight in zip(*query.row(i)):
            a, b = p.indptr[latent], p.indptr[latent + 1]
            np.maximum.at(best, index.row_doc[p.doc_ids[a:b].astype(np.int64)], weight * p.values[a:b].astype(np.float64))
        scores += np.where(np.isfinite(best), best, 0.0)
    return scores
