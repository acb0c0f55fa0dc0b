"""The shared data readers, and that training never sees a test split."""

from __future__ import annotations

import numpy as np
import pytest
from tests.sparse.fixtures import needs_shared_data

from seqtopk.sparse.data import readers

pytestmark = needs_shared_data


def test_counts_match_the_data_readmes():
    assert len(readers.scifact_corpus()) == 5183
    assert (len(readers.scifact_queries("train")), len(readers.scifact_queries("test"))) == (809, 300)
    assert [len(readers.stsb_pairs(s)) for s in ("train", "dev", "test")] == [5749, 1500, 1379]
    assert [len(readers.sick_pairs(s)) for s in ("train", "trial", "test")] == [4500, 500, 4927]
    assert [len(readers.banking77_rows(s)) for s in ("train", "test")] == [10003, 3080]


def _train_split_texts() -> set[str]:
    corpus = readers.scifact_corpus()
    texts = set(readers.scifact_queries("train").values())
    texts |= {readers.scifact_document_text(corpus[d]) for docs in readers.scifact_qrels("train").values() for d in docs}
    texts |= {t for a, b, _ in readers.stsb_pairs("train") for t in (a, b)}
    texts |= {t for a, b, _ in readers.sick_pairs("train") for t in (a, b)}
    texts |= {t for t, _ in readers.banking77_rows("train")}
    return texts


def test_training_sets_come_from_train_splits_only():
    allowed = _train_split_texts()
    sets = readers.load_training_sets()
    assert [s.name for s in sets] == ["scifact", "stsb", "sick", "banking77"]
    for s in sets:
        assert set(s.texts) <= allowed, s.name
    test_only = set(readers.scifact_queries("test").values()) - allowed
    test_only |= {t for a, b, _ in readers.stsb_pairs("test") + readers.sick_pairs("test") for t in (a, b)} - allowed
    test_only |= {t for t, _ in readers.banking77_rows("test")} - allowed
    assert test_only and not test_only & {t for s in sets for t in s.texts}
    # held-out texts (dead-latent counts) come from dev splits and unjudged documents
    judged_test_docs = {d for docs in readers.scifact_qrels("test").values() for d in docs}
    corpus = readers.scifact_corpus()
    assert not {readers.scifact_document_text(corpus[d]) for d in judged_test_docs} & set(sets[0].heldout)
    assert set(sets[1].heldout) == {t for a, b, _ in readers.stsb_pairs("dev") for t in (a, b)}


def test_positive_pairs_share_labels_and_respect_the_sts_threshold():
    stsb = readers.stsb_train()
    assert (stsb.labels[stsb.pairs[:, 0]] == stsb.labels[stsb.pairs[:, 1]]).all()
    expected = sum(1 for *_, score in readers.stsb_pairs("train") if score >= 3.0)
    assert len(stsb.pairs) == expected
    assert readers.SICK_POSITIVE_MIN == pytest.approx(3.4)
    scifact = readers.scifact_train()
    assert len(scifact.pairs) == 919


def test_classification_pairs_are_resampled_within_a_label():
    banking = readers.banking77_train()
    rng = np.random.default_rng(0)
    first, second = banking.sample_pairs(rng), banking.sample_pairs(rng)
    assert len(first) == len(banking.texts)
    assert (banking.labels[first[:, 0]] == banking.labels[first[:, 1]]).all()
    assert (first[:, 0] != first[:, 1]).all() and not np.array_equal(first, second)


def test_missing_data_folder_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQTOPK_SHARED", str(tmp_path))
    readers.scifact_corpus.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="SEQTOPK_SHARED"):
            readers.scifact_corpus()
    finally:
        readers.scifact_corpus.cache_clear()


def test_the_beir_jsonl_reader_joins_title_and_text_and_refuses_bad_lines_by_number(tmp_path):
    """One reader for every user-given corpus or query file (csr export / engine-search, ssr index / export)."""
    import json

    path = tmp_path / "corpus.jsonl"
    rows = [{"_id": 7, "title": "Bone", "text": "density"}, {"id": "q2", "text": "only text"},
            {"_id": "t", "title": "only title", "text": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is skipped
    assert readers.read_beir_jsonl(path) == (["7", "q2", "t"], ["Bone density", "only text", "only title"])
    assert readers.read_beir_jsonl(path)[1][0] == readers.scifact_document_text(rows[0])  # the MTEB joining rule

    good = json.dumps({"_id": "a", "text": "fine"}) + "\n"
    for bad, message in [("not json", ":2 is not a JSON object"), ("[1, 2]", ":2 is a JSON list"),
                         (json.dumps({"text": "no id"}), ':2 has no "_id"'),
                         (json.dumps({"_id": "  ", "text": "blank id"}), ':2 has no "_id"'),
                         (json.dumps({"_id": "b", "title": "", "text": " "}), 'has no "text" or "title"'),
                         (json.dumps({"_id": "b", "text": 12}), 'has a int as "text"'),
                         (json.dumps({"_id": "a", "text": "again"}), "repeats the id 'a'")]:
        path.write_text(good + bad + "\n")
        with pytest.raises(ValueError, match=message):
            readers.read_beir_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no rows"):
        readers.read_beir_jsonl(path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        readers.read_beir_jsonl(tmp_path / "missing.jsonl")
