"""SSR on real components: a token SAE trained by real steps, real SciFact text encoded and indexed, exact
MaxSim from the index against brute force, the CLI's steps and its refusals of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tests.sparse.fixtures import needs_shared_data
from tests.sparse.ssr_fixtures import TINY_SSR_K, TINY_SSR_LATENTS, own_token_cache, scifact_slice, tiny_ssr

from seqtopk.cli import main

pytestmark = [needs_shared_data, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _own_token_cache():
    with own_token_cache():
        yield


@pytest.fixture(scope="module")
def encoder():
    from seqtopk.sparse.ssr.encoder import SSREncoder

    return SSREncoder(tiny_ssr())


@pytest.fixture(scope="module")
def built(encoder):
    from seqtopk.sparse.ssr.index import SSRIndex

    data = scifact_slice()
    ssr, _ = SSRIndex.build(tiny_ssr(), data.doc_ids, data.doc_texts, encoder=encoder)
    return data, ssr


def test_training_wrote_a_complete_folder_with_dead_latents_counted_on_held_out_text(encoder):
    from seqtopk.sparse.ssr.folder import check_ssr_folder
    from seqtopk.sparse.ssr.train import training_pairs

    summary = json.loads((tiny_ssr() / "ssr_training.json").read_text())
    assert check_ssr_folder(tiny_ssr())["k"] == TINY_SSR_K
    assert summary["heldout_texts"] == 16 and summary["heldout_tokens"] > 16
    # Recount from the saved folder, by another path (the sparse codes an index is built from): a latent is
    # dead when no held-out document token has it among its non-zero entries.
    heldout = training_pairs(96)[3][:16]
    tokens = encoder.tokens.encode(heldout, "document")
    fired = np.unique(encoder.sae.sparse_codes(tokens.vectors).indices)
    assert len(tokens.vectors) == summary["heldout_tokens"]
    assert summary["dead_latent_fraction_heldout"] == pytest.approx(1.0 - len(fired) / TINY_SSR_LATENTS, abs=1e-12)
    assert summary["final"]["step"] == 30 and np.isfinite(summary["final"]["loss"])
    assert summary["history"][-1]["recon"] < summary["history"][0]["recon"]  # reconstruction was learned


def test_codes_are_k_sparse_unit_vectors_and_documents_drop_punctuation(encoder):
    codes = encoder.encode(["Vitamin D, calcium; and bone density.", "What reduces bone loss?"], "document")
    lengths = np.diff(codes.codes.indptr)
    assert np.all((lengths >= 1) & (lengths <= TINY_SSR_K))
    norms = np.sqrt(np.add.reduceat(codes.codes.values.astype(np.float64) ** 2, codes.codes.indptr[:-1]))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    words = encoder.tokens.tokenizer.convert_ids_to_tokens(codes.token_ids[codes.offsets[0]:codes.offsets[1]].tolist())
    assert words == ["vitamin", "d", "calcium", "and", "bone", "density"]
    query = encoder.encode(["bone loss?"], "query")
    assert encoder.tokens.tokenizer.convert_ids_to_tokens(query.token_ids.tolist()) == ["bone", "loss", "?"]


def test_index_scores_equal_brute_force_maxsim_on_real_scifact_text(encoder, built):
    from seqtopk.sparse.ssr.authors_path import single_product_scores

    data, ssr = built
    docs = encoder.encode(data.doc_texts, "document")
    dense_docs = docs.codes.to_dense().astype(np.float64)
    gaps = []
    for text in data.query_texts:
        query = encoder.encode_query(text)
        q = query.to_dense().astype(np.float64)
        brute = np.array([(q @ dense_docs[docs.offsets[d]:docs.offsets[d + 1]].T).max(axis=1).sum()
                          for d in range(len(docs))])
        np.testing.assert_allclose(ssr.index.maxsim(query), brute, rtol=1e-5, atol=1e-6)
        authors = single_product_scores(ssr.index, query)
        assert np.all(authors <= brute + 1e-6)
        gaps.append(np.mean(brute - authors))
    assert np.mean(gaps) > 0.05  # the authors' path loses real score on real text


def _ndcg_at_10(ranked: list[str], judged: dict[str, int]) -> float:
    """nDCG@10 as pytrec_eval computes it: gain = relevance, discount log2(rank + 1), ideal from every judged doc."""
    dcg = sum(judged.get(d, 0) / np.log2(r + 2) for r, d in enumerate(ranked[:10]))
    ideal = sum(g / np.log2(r + 2) for r, g in enumerate(sorted(judged.values(), reverse=True)[:10]))
    return dcg / ideal


def test_two_stage_search_reports_pool_recall_against_exhaustive(encoder, built):
    from seqtopk.sparse.ssr.evaluate import evaluate_ssr

    data = scifact_slice()
    result = evaluate_ssr(tiny_ssr(), data, pools=(None, 20), probe=4, top=10)
    exhaustive, two_stage = result["runs"]
    assert result["docs"] == len(data.doc_ids) and result["index_bytes"] > 0

    # The same figures from brute-force MaxSim over the encoder's codes (no index), and from a random ranking.
    docs = encoder.encode(data.doc_texts, "document")
    dense_docs = docs.codes.to_dense().astype(np.float64)
    rng = np.random.default_rng(0)
    ndcg, random_ndcg, recall = [], [], []
    for qid, text in zip(data.query_ids, data.query_texts):
        query = encoder.encode_query(text)
        q = query.to_dense().astype(np.float64)
        scores = np.array([(q @ dense_docs[docs.offsets[d]:docs.offsets[d + 1]].T).max(axis=1).sum()
                           for d in range(len(docs))])
        top10 = [data.doc_ids[d] for d in np.argsort(-scores, kind="stable")[:10]]
        ndcg.append(_ndcg_at_10(top10, data.qrels[qid]))
        random_ndcg.append(_ndcg_at_10([data.doc_ids[d] for d in rng.permutation(len(docs))], data.qrels[qid]))
        pooled, _ = built[1].index.search(query, 10, pool=20, probe=4)
        recall.append(len({data.doc_ids[d] for d in pooled} & set(top10)) / 10)
    assert exhaustive["ndcg_at_10"] == pytest.approx(100 * np.mean(ndcg), abs=1e-6)
    assert exhaustive["ndcg_at_10"] > 100 * np.mean(random_ndcg) + 10  # the trained codes rank, not chance
    assert two_stage["pool_recall_at_10"] == pytest.approx(np.mean(recall), abs=1e-9)


def test_cli_index_search_and_its_refusals(tmp_path, capsys):
    data = scifact_slice()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                              for i, t in zip(data.doc_ids[:12], data.doc_texts[:12])))
    index = tmp_path / "slice.idx"
    assert main(["ssr", "index", str(tiny_ssr()), "--corpus", str(corpus), "--out", str(index), "--quiet"]) == 0
    assert "indexed 12 documents" in capsys.readouterr().out
    assert main(["ssr", "search", str(index), "--query", data.query_texts[0], "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"] and hits[0]["doc_id"] in data.doc_ids

    saved = index.read_bytes()
    for bad_line, message in [({"_id": "x", "text": ""}, "has no \"text\""), ({"text": "no id here"}, "has no \"_id\"")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(corpus.read_text() + json.dumps(bad_line) + "\n")
        assert main(["ssr", "index", str(tiny_ssr()), "--corpus", str(bad), "--out", str(index), "--quiet"]) == 2
        assert message in capsys.readouterr().err
        assert index.read_bytes() == saved  # nothing overwritten

    assert main(["ssr", "search", str(index), "--query", "   "]) == 2
    assert "query is empty" in capsys.readouterr().err

    other = tmp_path / "other-head"
    shutil.copytree(tiny_ssr(), other)
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "ssr_head" / "model.safetensors"))
    state["latent_bias"] = state["latent_bias"] + 0.01
    save_file(state, str(other / "ssr_head" / "model.safetensors"))
    assert main(["ssr", "search", str(index), "--query", "bone", "--head", str(other)]) == 2
    assert "built by another SSR head" in capsys.readouterr().err

    truncated = tmp_path / "truncated.idx"
    truncated.write_bytes(saved[: len(saved) // 2])
    assert main(["ssr", "search", str(truncated), "--query", "bone"]) == 2
    assert "truncated" in capsys.readouterr().err


def test_export_yields_every_indexed_token_code(built):
    data, ssr = built
    codes = list(ssr.index.token_codes(docs=[0, 1]))
    assert {c.doc_id for c in codes} == set(data.doc_ids[:2])
    assert [c.position for c in codes if c.doc_id == data.doc_ids[0]] == list(range(ssr.index.doc_lengths[0]))
    assert all(0 < len(c.latent_ids) <= TINY_SSR_K and c.latent_ids.max() < TINY_SSR_LATENTS for c in codes)


def test_text_search_two_stage_walks_the_default_probe_like_ssr_eval(built, monkeypatch):
    """`ssr search --pool` and `ssr eval` share one first stage: DEFAULT_PROBE strongest latents per query token
    (the tiny head's k equals 8, so the walk itself cannot tell; the probe the index receives can)."""
    from seqtopk.sparse.ssr.index import DEFAULT_PROBE

    data, ssr = built
    asked = []
    search = ssr.index.search
    monkeypatch.setattr(ssr.index, "search", lambda *a, **kw: asked.append(kw) or search(*a, **kw))
    hits = ssr.search(data.query_texts[0], 5, pool=10)
    assert asked == [{"pool": 10, "probe": DEFAULT_PROBE}] and DEFAULT_PROBE == 8 and len(hits) == 5
