"""Sparse codes exported to real embedded engines (Milvus Lite in-process, Qdrant local mode) search the same
as our exact inverted index; bad input and failed exports leave collections as they were."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seqtopk.testing.require import require_module

from seqtopk.sparse.export import CodesInfo, EngineError, open_engine
from seqtopk.sparse.index import InvertedIndex, SparseRows
from seqtopk.sparse.synthetic import CodeStatistics, synthetic_corpus
from tests.sparse.fixtures import needs_shared_data, tiny_finetuned_head, tiny_head

require_module("pymilvus", 'pip install "seqtopk[vector-engines]"', allow_module_level=True)
require_module("qdrant_client", 'pip install "seqtopk[vector-engines]"', allow_module_level=True)

DIM, K = 256, 8


def _corpus(n_docs: int, seed: int) -> SparseRows:
    """Rows with skewed latent frequencies (some latents fire in many documents) and no tied values."""
    rng = np.random.default_rng(seed)
    rate = rng.dirichlet(np.full(DIM, 0.3))
    dense = np.zeros((400, DIM), dtype=np.float32)
    for row in dense:
        row[rng.choice(DIM, size=K, replace=False, p=rate)] = rng.gamma(2.0, 0.1, size=K) + 0.01
    stats = CodeStatistics.from_codes(SparseRows.from_dense(dense))
    rows = synthetic_corpus(stats, n_docs, seed=seed)
    rows.values += rng.random(len(rows.values)).astype(np.float32) * 1e-3  # break value ties (ties reorder hits)
    return rows.l2_normalized()


def _engine(name: str, tmp_path):
    uri = str(tmp_path / "codes.db") if name == "milvus" else ":memory:"
    return open_engine(name, uri, "docs")


def _assert_same_as_exact(engine, docs: SparseRows, doc_ids: list[str], queries: SparseRows) -> None:
    exact = InvertedIndex(docs)
    hits = engine.search(queries, k=10)
    for i, found in enumerate(hits):
        ids, scores = exact.search(*queries.row(i), k=10)
        assert [h.doc_id for h in found] == [doc_ids[j] for j in ids]  # recall@10 = 1.0, same order
        np.testing.assert_allclose([h.score for h in found], scores, rtol=1e-5)


@pytest.mark.parametrize("name", ["milvus", "qdrant"])
def test_an_exported_collection_searches_like_our_exact_index(name, tmp_path):
    docs, queries = _corpus(1500, seed=1), _corpus(25, seed=2)
    doc_ids = [f"doc-{i}" for i in range(docs.n_rows)]
    info = CodesInfo(dim=DIM, head="synthetic", k=K)
    with _engine(name, tmp_path) as engine:
        assert engine.write(docs, doc_ids, info, batch_size=600, progress=False) == docs.n_rows
        assert engine.count() == docs.n_rows and engine.info() == info
        _assert_same_as_exact(engine, docs, doc_ids, queries)

        with pytest.raises(EngineError, match="already exists; pass --overwrite"):
            engine.write(docs, doc_ids, info, progress=False)
        assert engine.count() == docs.n_rows

        fewer = SparseRows(docs.indptr[:301], docs.indices[:docs.indptr[300]], docs.values[:docs.indptr[300]], DIM)
        engine.write(fewer, doc_ids[:300], info, overwrite=True, progress=False)
        assert engine.count() == 300
        _assert_same_as_exact(engine, fewer, doc_ids[:300], queries)
        empty_query = SparseRows(np.zeros(2, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), DIM)
        assert engine.search(empty_query) == [[]]


@pytest.mark.parametrize("name", ["milvus", "qdrant"])
def test_bad_input_is_refused_before_the_collection_changes(name, tmp_path):
    docs = _corpus(200, seed=3)
    doc_ids = [f"d{i}" for i in range(docs.n_rows)]
    info = CodesInfo(dim=DIM, head="synthetic", k=K)
    with _engine(name, tmp_path) as engine:
        with pytest.raises(EngineError, match=r"does not exist; create it with `seqtopk csr export` \(or `ssr export`"):
            engine.search(docs)
        engine.write(docs, doc_ids, info, progress=False)
        nan = SparseRows(docs.indptr, docs.indices, docs.values.copy(), DIM)
        nan.values[5] = np.nan
        for codes, ids, match in [
            (docs, doc_ids[:-1] + ["d0"], "appears twice"),
            (docs, doc_ids[:-1], "do not match"),
            (nan, doc_ids, "NaN"),
            (docs, doc_ids[:-1] + ["x" * 600], "at most 512"),
        ]:
            with pytest.raises(EngineError, match=match):
                engine.write(codes, ids, info, overwrite=True, progress=False)
        assert engine.count() == docs.n_rows
        wider = SparseRows(docs.indptr, docs.indices, docs.values, DIM * 2)
        with pytest.raises(EngineError, match="encode queries with the head the collection was exported with"):
            engine.search(wider)
    with pytest.raises(EngineError, match="must start with a letter"):
        open_engine(name, ":memory:", "two words")


def test_a_collection_seqtopk_did_not_write_is_never_replaced(tmp_path):
    from qdrant_client import models

    with open_engine("qdrant", ":memory:", "theirs") as engine:
        engine.client.create_collection("theirs", vectors_config={},
                                        sparse_vectors_config={"code": models.SparseVectorParams()})
        docs = _corpus(50, seed=4)
        with pytest.raises(EngineError, match="did not write"):
            engine.write(docs, [str(i) for i in range(50)], CodesInfo(DIM, "x", K), overwrite=True, progress=False)
        assert engine.client.collection_exists("theirs") and engine.client.count("theirs").count == 0


@pytest.mark.parametrize("name", ["milvus", "qdrant"])
def test_a_failed_export_leaves_the_previous_collection_or_nothing(name, tmp_path, monkeypatch):
    docs = _corpus(300, seed=5)
    doc_ids = [f"d{i}" for i in range(docs.n_rows)]
    info = CodesInfo(dim=DIM, head="synthetic", k=K)
    with _engine(name, tmp_path) as engine:
        if name == "qdrant":  # Qdrant publishes by switching an alias: the old collection stays whole
            engine.write(docs, doc_ids, info, progress=False)
        calls = []
        insert = "insert" if name == "milvus" else "upsert"
        real = getattr(engine.client, insert)

        def fails_on_the_second_batch(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise ConnectionError("connection to the engine lost")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.client, insert, fails_on_the_second_batch)
        with pytest.raises(ConnectionError):
            engine.write(docs, doc_ids, info, overwrite=True, batch_size=100, progress=False)
        monkeypatch.undo()
        if name == "qdrant":
            assert engine.count() == docs.n_rows
            _assert_same_as_exact(engine, docs, doc_ids, _corpus(5, seed=6))
            published = [a.collection_name for a in engine.client.get_aliases().aliases]
            assert [c.name for c in engine.client.get_collections().collections] == published  # the staged one is gone
        else:  # Milvus Lite cannot rename or alias: the export wrote under the name and removes what it wrote
            assert engine.read_info() is None


@needs_shared_data
@pytest.mark.parametrize("make_head", [tiny_head, tiny_finetuned_head], ids=["frozen-backbone", "finetuned-backbone"])
def test_cli_export_and_engine_search_agree_with_the_exact_index(tmp_path, capsys, make_head):
    from seqtopk.cli import main
    from seqtopk.sparse.data import readers
    from seqtopk.sparse.export.texts import HeadEncoder

    head = make_head()
    corpus = list(readers.scifact_corpus().values())[:60]
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"_id": d["_id"], "title": d["title"], "text": d["text"]}) + "\n"
                                   for d in corpus))
    queries = list(readers.scifact_queries("test").values())[:4]
    encoder = HeadEncoder(head)
    exact = InvertedIndex(encoder.encode([readers.scifact_document_text(d) for d in corpus]))
    query_codes = encoder.encode(queries)
    expected = [[corpus[j]["_id"] for j in exact.search(*query_codes.row(i), k=5)[0]] for i in range(len(queries))]

    for engine, uri in [("milvus", str(tmp_path / "codes.db")), ("qdrant", str(tmp_path / "qdrant"))]:
        where = ["--engine", engine, "--uri", uri, "--collection", "scifact"]
        assert main(["csr", "export", str(head), "--corpus", str(corpus_file), *where, "--quiet"]) == 0
        assert "exported 60 codes" in capsys.readouterr().out
        assert main(["csr", "export", str(head), "--corpus", str(corpus_file), *where, "--quiet"]) == 2
        assert "already exists; pass --overwrite" in capsys.readouterr().err
        args = ["csr", "engine-search", str(head), *where, "--k", "5"]
        assert main(args + [a for q in queries for a in ("--query", q)]) == 0
        found = json.loads(capsys.readouterr().out)
        assert [[h["doc_id"] for h in row["hits"]] for row in found] == expected


@needs_shared_data
def test_cli_export_of_a_corpus_whose_last_code_is_all_zero(tmp_path, capsys):
    """A document whose top-k pre-activations are all <= 0 gets an empty code; as the last row it used to make
    the export's L2 normalisation raise IndexError. Here a real head is shifted so exactly that happens."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from seqtopk.cli import main
    from seqtopk.sparse.backbone import load_backbone
    from seqtopk.sparse.data import readers
    from seqtopk.sparse.export.texts import HeadEncoder

    head = tmp_path / "head"
    shutil.copytree(tiny_head(), head)
    corpus = list(readers.scifact_corpus().values())[:8]
    texts = [readers.scifact_document_text(d) for d in corpus]
    weights = head / "3_SparseAutoEncoder" / "model.safetensors"
    state = load_file(str(weights))
    weight = state["encoder.weight"] if "encoder.weight" in state else state["decoder.linear.weight"]
    last = torch.from_numpy(load_backbone(head).encode(texts[-1:]))[0]
    # latent bias = minus the last text's pre-activations, less a margin: every latent of that text is negative,
    # while any other text keeps W (x - x_last) - margin, positive on some latents.
    state["latent_bias"] = -(weight @ (last - state["pre_bias"])) - 0.05
    save_file(state, str(weights))
    codes = HeadEncoder(head).encode(texts)
    lengths = np.diff(codes.indptr)
    assert lengths[-1] == 0 and np.all(lengths[:-1] > 0)  # the case under test, from the real encoder

    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"_id": d["_id"], "title": d["title"], "text": d["text"]}) + "\n"
                                   for d in corpus))
    where = ["--engine", "qdrant", "--uri", str(tmp_path / "qdrant"), "--collection", "scifact"]
    assert main(["csr", "export", str(head), "--corpus", str(corpus_file), *where, "--quiet"]) == 0
    assert "exported 8 codes" in capsys.readouterr().out
    with open_engine("qdrant", str(tmp_path / "qdrant"), "scifact") as engine:
        assert engine.count() == 8
        _assert_same_as_exact(engine, codes, [d["_id"] for d in corpus], codes)
