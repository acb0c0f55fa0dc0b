"""The multi-vector index: exact MaxSim from posting lists, the authors' single-product path, two-stage
search, the saved file (atomic, checked, refused when foreign or truncated) and the token-code export."""

from __future__ import annotations

import numpy as np
import pytest

from seqtopk.testing.require import require_module

from seqtopk.sparse.index import IndexFileError, InvertedIndex
from seqtopk.sparse.index.multivector import MultiVectorIndex, strongest_latents
from seqtopk.sparse.index.rows import SparseRows
from seqtopk.sparse.ssr.authors_path import single_product_scores

DIM = 96


def random_codes(rng, n, k, signed=False):
    dense = np.zeros((n, DIM), np.float32)
    for row in range(n):
        latents = rng.choice(DIM, k, replace=False)
        dense[row, latents] = rng.normal(size=k) if signed else rng.random(k)
    return dense


def random_corpus(rng, n_docs=120, signed=False):
    lengths = rng.integers(1, 12, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return random_codes(rng, int(offsets[-1]), 8, signed), offsets


def brute_force_maxsim(query, docs, offsets):
    """sum over query tokens of the max over a document's tokens of the full dot product (float64)."""
    q, d = query.astype(np.float64), docs.astype(np.float64)
    return np.array([(q @ d[offsets[i]:offsets[i + 1]].T).max(axis=1).sum() for i in range(len(offsets) - 1)])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("use_numba", [True, False])
def test_index_maxsim_equals_brute_force_on_random_codes(signed, use_numba):
    rng = np.random.default_rng(1)
    docs, offsets = random_corpus(rng, signed=signed)
    index = MultiVectorIndex(SparseRows.from_dense(docs), offsets, use_numba=use_numba)
    for _ in range(5):
        query = random_codes(rng, int(rng.integers(1, 9)), 8, signed)
        expected = brute_force_maxsim(query, docs, offsets)
        scores = index.maxsim(SparseRows.from_dense(query))
        reached = scores != 0  # a document sharing no latent with any query token is not walked
        np.testing.assert_allclose(scores[reached], expected[reached], rtol=1e-6, atol=1e-6)
        if not signed:
            np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(index.rescore(SparseRows.from_dense(query), np.arange(len(offsets) - 1)),
                                   expected, rtol=1e-6, atol=1e-6)


def test_the_authors_single_product_path_is_a_lower_bound_not_maxsim():
    rng = np.random.default_rng(2)
    docs, offsets = random_corpus(rng)
    index = MultiVectorIndex(SparseRows.from_dense(docs), offsets)
    query = random_codes(rng, 6, 8)
    exact = brute_force_maxsim(query, docs, offsets)
    authors = single_product_scores(index, SparseRows.from_dense(query))
    assert np.all(authors <= exact + 1e-9)
    assert np.mean(authors < exact - 1e-6) > 0.5  # most documents score lower than MaxSim
    # Rankings differ too: the top 10 is not the same set.
    assert set(np.argsort(-exact)[:10]) != set(np.argsort(-authors)[:10])


def test_a_hand_checked_case():
    # doc 0: one token sharing two latents with the query token; doc 1: two tokens sharing one latent each.
    docs = np.zeros((3, DIM), np.float32)
    docs[0, [1, 2]] = 0.6, 0.8
    docs[1, 1], docs[2, 2] = 1.0, 1.0
    index = MultiVectorIndex(SparseRows.from_dense(docs), [0, 1, 3])
    query = np.zeros((1, DIM), np.float32)
    query[0, [1, 2]] = 0.6, 0.8
    q = SparseRows.from_dense(query)
    np.testing.assert_allclose(index.maxsim(q), [1.0, 0.8], rtol=1e-6)  # 0.36 + 0.64; max(0.6, 0.8)
    np.testing.assert_allclose(single_product_scores(index, q), [0.64, 0.8], rtol=1e-6)  # ranks doc 1 first
    ids, scores = index.search(q, k=2)
    assert ids.tolist() == [0, 1]


def test_two_stage_search_is_exact_on_its_pool_and_recalls_exhaustive_search():
    rng = np.random.default_rng(3)
    docs, offsets = random_corpus(rng, n_docs=300)
    index = MultiVectorIndex(SparseRows.from_dense(docs), offsets)
    recalls = []
    for _ in range(10):
        query = SparseRows.from_dense(random_codes(rng, 5, 8))
        exhaustive, exhaustive_scores = index.search(query, k=10)
        full_pool, full_scores = index.search(query, k=10, pool=index.n_docs)
        np.testing.assert_array_equal(full_pool, exhaustive)
        np.testing.assert_allclose(full_scores, exhaustive_scores, rtol=1e-9)
        ids, scores = index.search(query, k=10, pool=40, probe=4)
        np.testing.assert_allclose(scores, brute_force_maxsim(query.to_dense(), docs, offsets)[ids], rtol=1e-6)
        recalls.append(len(set(ids) & set(exhaustive)) / 10)
    assert 0.5 < np.mean(recalls) <= 1.0
    pruned = strongest_latents(SparseRows.from_dense(random_codes(rng, 3, 8)), 2)
    assert np.diff(pruned.indptr).tolist() == [2, 2, 2]


def test_save_load_roundtrip_and_token_code_export(tmp_path):
    rng = np.random.default_rng(4)
    docs, offsets = random_corpus(rng, n_docs=20)
    ids = [f"doc-{i}" for i in range(20)]
    token_ids = rng.integers(1000, 2000, size=len(docs)).astype(np.int32)
    index = MultiVectorIndex(SparseRows.from_dense(docs), offsets, ids, token_ids, meta={"head_fingerprint": "abc"})
    index.save(tmp_path / "ssr.idx")
    loaded = MultiVectorIndex.load(tmp_path / "ssr.idx")
    assert loaded.doc_ids == ids and loaded.meta == {"head_fingerprint": "abc"} and loaded.nbytes == index.nbytes
    query = SparseRows.from_dense(random_codes(rng, 4, 8))
    np.testing.assert_array_equal(loaded.maxsim(query), index.maxsim(query))
    exported = list(loaded.token_codes())
    assert len(exported) == len(docs)
    first = exported[offsets[3]]
    assert (first.doc_id, first.position, first.token_id) == ("doc-3", 0, token_ids[offsets[3]])
    np.testing.assert_array_equal(first.latent_ids, np.flatnonzero(docs[offsets[3]]))
    np.testing.assert_allclose(first.values, docs[offsets[3]][first.latent_ids])


def test_truncated_foreign_and_csr_files_are_refused_and_a_csr_index_still_loads(tmp_path):
    rng = np.random.default_rng(5)
    docs, offsets = random_corpus(rng, n_docs=10)
    path = tmp_path / "ssr.idx"
    MultiVectorIndex(SparseRows.from_dense(docs), offsets).save(path)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.idx").write_bytes(data[:cut])
        with pytest.raises(IndexFileError, match="cut.idx"):
            MultiVectorIndex.load(tmp_path / "cut.idx")
    csr = InvertedIndex(SparseRows.from_dense(docs[:5]))
    csr.save(tmp_path / "csr.idx")
    with pytest.raises(IndexFileError, match="seqtopk-inverted-index file; load it with InvertedIndex.load"):
        MultiVectorIndex.load(tmp_path / "csr.idx")
    with pytest.raises(IndexFileError, match="multivector-index file; load it with MultiVectorIndex.load"):
        InvertedIndex.load(path)
    assert InvertedIndex.load(tmp_path / "csr.idx").n_docs == 5


def test_bad_queries_raise():
    rng = np.random.default_rng(6)
    docs, offsets = random_corpus(rng, n_docs=10)
    index = MultiVectorIndex(SparseRows.from_dense(docs), offsets)
    with pytest.raises(ValueError, match="no tokens"):
        index.search(SparseRows(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), DIM))
    with pytest.raises(ValueError, match="different heads"):
        index.search(SparseRows.from_dense(np.ones((1, DIM + 1), np.float32)))
    with pytest.raises(ValueError, match="pool"):
        index.search(SparseRows.from_dense(random_codes(rng, 2, 8)), k=10, pool=5)


@pytest.mark.parametrize("empty_docs", [[7], [0, 3, 7]], ids=["last", "first-middle-last"])
def test_dense_maxsim_gives_a_document_without_tokens_zero(empty_docs):
    """A document whose tokens were all dropped has no rows; the last one used to make reduceat raise."""
    from seqtopk.sparse.ssr.baselines import dense_maxsim_scores

    rng = np.random.default_rng(8)
    lengths = rng.integers(1, 6, size=8)
    lengths[empty_docs] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    vectors = rng.normal(size=(int(offsets[-1]), 16)).astype(np.float32)
    query = rng.normal(size=(3, 16)).astype(np.float32)
    expected = [(query @ vectors[a:b].T).max(axis=1).sum() if b > a else 0.0 for a, b in zip(offsets[:-1], offsets[1:])]
    np.testing.assert_allclose(dense_maxsim_scores(query, vectors, offsets[:-1]), expected, rtol=1e-5)


def test_kmeans_baseline_probing_every_centroid_is_exact_dense_maxsim():
    require_module("faiss", "pip install seqtopk[embeddings]")
    from seqtopk.sparse.ssr.baselines import KMeansIndex, dense_maxsim_scores

    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 10, size=60)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    vectors = rng.normal(size=(int(offsets[-1]), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = KMeansIndex(vectors, offsets, n_centroids=8, niter=5)
    query = vectors[:4] + 0.1 * rng.normal(size=(4, 16)).astype(np.float32)
    exact = dense_maxsim_scores(query, vectors, offsets[:-1])
    ids, scores = index.search(query, 10, nprobe=8)
    np.testing.assert_array_equal(ids, np.argsort(-exact, kind="stable")[:10])
    np.testing.assert_allclose(scores, exact[ids], rtol=1e-5)
    few, _ = index.search(query, 10, nprobe=1)  # fewer centroids: fewer candidates, a subset of the documents
    assert len(few) <= 10 and set(few) <= set(range(60))
