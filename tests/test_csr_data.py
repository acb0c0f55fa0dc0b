"""The shared data readers, and that training never sees a test split."""

from __future__ import annotations

import numpy as np
import pytest
from tests.csr_fixtures import needs_shared_data

from seqtopk.csr import data

pytestmark = needs_shared_data


def test_counts_match_the_data_readmes():
    assert len(data.scifact_corpus()) == 5183
    assert (len(data.scifact_queries("train")), len(data.scifact_queries("test"))) == (809, 300)
    assert [len(data.stsb_pairs(s)) for s in ("train", "dev", "test")] == [5749, 1500, 1379]
    assert [len(data.sick_pairs(s)) for s in ("train", "trial", "test")] == [4500, 500, 4927]
    assert [len(data.banking77_rows(s)) for s in ("train", "test")] == [10003, 3080]


def _train_split_texts() -> set[str]:
    corpus = data.scifact_corpus()
    texts = set(data.scifact_queries("train").values())
    texts |= {data.scifact_document_text(corpus[d]) for docs in data.scifact_qrels("train").values() for d in docs}
    texts |= {t for a, b, _ in data.stsb_pairs("train") for t in (a, b)}
    texts |= {t for a, b, _ in data.sick_pairs("train") for t in (a, b)}
    texts |= {t for t, _ in data.banking77_rows("train")}
    return texts


def test_training_sets_come_from_train_splits_only():
    allowed = _train_split_texts()
    sets = data.load_training_sets()
    assert [s.name for s in sets] == ["scifact", "stsb", "sick", "banking77"]
    for s in sets:
        assert set(s.texts) <= allowed, s.name
    test_only = set(data.scifact_queries("test").values()) - allowed
    test_only |= {t for a, b, _ in data.stsb_pairs("test") + data.sick_pairs("test") for t in (a, b)} - allowed
    test_only |= {t for t, _ in data.banking77_rows("test")} - allowed
    assert test_only and not test_only & {t for s in sets for t in s.texts}
    # held-out texts (dead-latent counts) come from dev splits and unjudged documents
    judged_test_docs = {d for docs in data.scifact_qrels("test").values() for d in docs}
    corpus = data.scifact_corpus()
    assert not {data.scifact_document_text(corpus[d]) for d in judged_test_docs} & set(sets[0].heldout)
    assert set(sets[1].heldout) == {t for a, b, _ in data.stsb_pairs("dev") for t in (a, b)}


def test_positive_pairs_share_labels_and_respect_the_sts_threshold():
    stsb = data.stsb_train()
    assert (stsb.labels[stsb.pairs[:, 0]] == stsb.labels[stsb.pairs[:, 1]]).all()
    expected = sum(1 for *_, score in data.stsb_pairs("train") if score >= 3.0)
    assert len(stsb.pairs) == expected
    assert data.SICK_POSITIVE_MIN == pytest.approx(3.4)
    scifact = data.scifact_train()
    assert len(scifact.pairs) == 919


def test_classification_pairs_are_resampled_within_a_label():
    banking = data.banking77_train()
    rng = np.random.default_rng(0)
    first, second = banking.sample_pairs(rng), banking.sample_pairs(rng)
    assert len(first) == len(banking.texts)
    assert (banking.labels[first[:, 0]] == banking.labels[first[:, 1]]).all()
    assert (first[:, 0] != first[:, 1]).all() and not np.array_equal(first, second)


def test_missing_data_folder_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQTOPK_SHARED", str(tmp_path))
    data.scifact_corpus.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="SEQTOPK_SHARED"):
            data.scifact_corpus()
    finally:
        data.scifact_corpus.cache_clear()
