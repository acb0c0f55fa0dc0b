"""Readers for the shared data (SciFact, STS-B, SICK, Banking77), the training sets built from them, and
`read_beir_jsonl`, the one reader of user-given BEIR-style corpus and query files.

Training sets come from train splits only; the test-split readers exist for evaluation and are never
called by training code (tests/test_csr_data.py checks that no training text comes from a test split).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from seqtopk.paths import data_dir

# STS positives: "score >= 3" on STS-B's 0-5 scale. SICK scores run 1-5; mapping them linearly onto
# 0-5 turns the same threshold into 3.4.
STSB_POSITIVE_MIN = 3.0
SICK_POSITIVE_MIN = 1.0 + STSB_POSITIVE_MIN * 4.0 / 5.0
TRAIN_SETS = ("scifact", "stsb", "sick", "banking77")


# ----------------------------------------------------------------------------------------------------
# Raw readers


def scifact_document_text(doc: dict) -> str:
    """A BEIR corpus entry (SciFact's or any other) as MTEB encodes it: title and text joined by a space."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def read_beir_jsonl(path: Path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR-style JSONL file (corpus.jsonl or queries.jsonl), checked whole before anything is
    encoded or written. The one reader of user-given corpora and query files (`csr export`, `csr engine-search`,
    `ssr index`, `ssr export`).

    Each non-blank line is a JSON object with an id ("_id", as BEIR writes it, or "id") and a string "text"
    and/or "title", not both empty; the text is scifact_document_text's (title and text joined by a space).
    Ids are kept as strings, must be non-blank and unique (an id names one row of an index or a collection;
    a repeat would be refused by the engine only after the whole corpus was encoded). A bad line is a
    ValueError naming the file, the line and what it lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no file at {path}; give a BEIR-style JSONL file (one {{"_id", "text"}} object a line, '
                                'optional "title")')
    ids, texts, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where} is not a JSON object ({err}); fix the line or remove it") from None
            if not isinstance(row, dict):
                raise ValueError(f'{where} is a JSON {type(row).__name__}, not an object with "_id" and "text"')
            row_id = row.get("_id", row.get("id"))
            if row_id is None or str(row_id).strip() == "":
                raise ValueError(f'{where} has no "_id"; every row needs an id')
            row_id = str(row_id)
            for key in ("title", "text"):
                if row.get(key) is not None and not isinstance(row[key], str):
                    raise ValueError(f'{where} (id {row_id}) has a {type(row[key]).__name__} as "{key}"; it must be a string')
            text = scifact_document_text(row)
            if not text:
                raise ValueError(f'{where} (id {row_id}) has no "text" or "title"; every row needs some text')
            if row_id in seen:
                raise ValueError(f"{where} repeats the id {row_id!r}; ids must be unique")
            seen.add(row_id)
            ids.append(row_id)
            texts.append(text)
    if not ids:
        raise ValueError(f"{path} holds no rows")
    return ids, texts


@lru_cache(maxsize=1)
def scifact_corpus() -> dict[str, dict]:
    with open(data_dir("scifact") / "corpus.jsonl", encoding="utf-8") as f:
        return {row["_id"]: row for row in map(json.loads, f)}


@lru_cache(maxsize=1)
def _scifact_queries() -> dict[str, str]:
    with open(data_dir("scifact") / "queries.jsonl", encoding="utf-8") as f:
        return {row["_id"]: row["text"] for row in map(json.loads, f)}


def scifact_qrels(split: str) -> dict[str, dict[str, int]]:
    """query id -> {doc id: relevance} for split 'train' or 'test'."""
    qrels: dict[str, dict[str, int]] = {}
    with open(data_dir("scifact") / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def scifact_queries(split: str) -> dict[str, str]:
    """The queries judged in the split's qrels (SciFact keeps train and test queries in one file)."""
    queries = _scifact_queries()
    return {qid: queries[qid] for qid in scifact_qrels(split)}


def stsb_pairs(split: str) -> list[tuple[str, str, float]]:
    """(sentence1, sentence2, score 0-5) for split 'train', 'dev' or 'test'."""
    path = data_dir("stsbenchmark") / f"sts-{split}.csv"
    with open(path, encoding="utf-8") as f:
        return [(row[5], row[6], float(row[4])) for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


_SICK_FILES = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


def sick_pairs(split: str) -> list[tuple[str, str, float]]:
    """(sentence_A, sentence_B, relatedness 1-5) for split 'train', 'trial' or 'test' (files have no header)."""
    if split not in _SICK_FILES:
        raise ValueError(f"unknown SICK split {split!r}; choose one of {sorted(_SICK_FILES)}")
    with open(data_dir("sick") / _SICK_FILES[split], encoding="utf-8") as f:
        return [(row[1], row[2], float(row[3])) for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def banking77_rows(split: str) -> list[tuple[str, str]]:
    """(text, intent) for split 'train' or 'test'."""
    with open(data_dir("banking77") / f"{split}.csv", encoding="utf-8", newline="") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------------
# Training sets


@dataclass
class TrainingSet:
    """Texts with group labels: two texts with the same label are positives of one another.

    `pairs` holds fixed (anchor, positive) text indices (query and relevant document, STS pair); when it
    is None, each epoch pairs every text with another text of its label (classification data).
    `heldout` holds texts of the same source that training never sees and that are not test data (dev
    splits, unjudged documents); they only serve to count dead latents.
    """

    name: str
    texts: list[str]
    labels: np.ndarray
    pairs: np.ndarray | None = None
    heldout: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.texts):
            raise ValueError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")

    def sample_pairs(self, rng: np.random.Generator) -> np.ndarray:
        """(n, 2) anchor/positive text indices for one epoch."""
        if self.pairs is not None:
            return self.pairs
        order = rng.permutation(len(self.texts))
        pairs = []
        for label_members in _group_by_label(self.labels[order], order):
            if len(label_members) < 2:
                continue
            partners = np.roll(label_members, 1)  # each text's positive is the previous one in a shuffled ring
            pairs.append(np.stack([label_members, partners], axis=1))
        if not pairs:
            raise ValueError(f"{self.name}: no label has two texts, so there are no positive pairs")
        return np.concatenate(pairs)


def _unique(texts) -> list[str]:
    return list(dict.fromkeys(texts))


def _group_by_label(labels: np.ndarray, members: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(members[order], bounds)


def _pairs_to_training_set(name: str, pairs: list[tuple[str, str]]) -> TrainingSet:
    """Positive pairs -> unique texts, fixed pairs, and labels joining every connected group of texts."""
    index: dict[str, int] = {}
    for a, b in pairs:
        index.setdefault(a, len(index))
        index.setdefault(b, len(index))
    parent = list(range(len(index)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pair_ids = np.array([(index[a], index[b]) for a, b in pairs], dtype=np.int64).reshape(-1, 2)
    for a, b in pair_ids:
        parent[root(a)] = root(b)
    labels = np.array([root(i) for i in range(len(index))], dtype=np.int64)
    return TrainingSet(name, list(index), labels, pair_ids)


def scifact_train() -> TrainingSet:
    """Train queries with their relevant documents; a query and its documents share a label."""
    queries, corpus = scifact_queries("train"), scifact_corpus()
    pairs = [
        (queries[qid], scifact_document_text(corpus[doc_id]))
        for qid, docs in scifact_qrels("train").items()
        for doc_id, score in docs.items()
        if score > 0
    ]
    train = _pairs_to_training_set("scifact", pairs)
    judged = {doc for docs in scifact_qrels("train").values() for doc in docs}
    judged |= {doc for docs in scifact_qrels("test").values() for doc in docs}
    train.heldout = [scifact_document_text(d) for doc_id, d in corpus.items() if doc_id not in judged]
    return train


def stsb_train() -> TrainingSet:
    pairs = [(a, b) for a, b, score in stsb_pairs("train") if score >= STSB_POSITIVE_MIN]
    train = _pairs_to_training_set("stsb", pairs)
    train.heldout = _unique(t for a, b, _ in stsb_pairs("dev") for t in (a, b))
    return train


def sick_train() -> TrainingSet:
    pairs = [(a, b) for a, b, score in sick_pairs("train") if score >= SICK_POSITIVE_MIN]
    train = _pairs_to_training_set("sick", pairs)
    train.heldout = _unique(t for a, b, _ in sick_pairs("trial") for t in (a, b))
    return train


def banking77_train() -> TrainingSet:
    rows = banking77_rows("train")
    intents = sorted({intent for _, intent in rows})
    label_of = {intent: i for i, intent in enumerate(intents)}
    return TrainingSet("banking77", [t for t, _ in rows], [label_of[i] for _, i in rows])


_BUILDERS = {"scifact": scifact_train, "stsb": stsb_train, "sick": sick_train, "banking77": banking77_train}


def load_file(path: Path) -> TrainingSet:
    """A JSONL file of {"anchor": ..., "positive": ...} pairs or {"text": ..., "label": ...} rows."""
    pairs, labelled = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "anchor" in row and "positive" in row:
                pairs.append((str(row["anchor"]), str(row["positive"])))
            elif "text" in row and "label" in row:
                labelled.append((str(row["text"]), str(row["label"])))
            else:
                raise ValueError(
                    f"{path}:{line_no}: expected keys anchor+positive or text+label, got {sorted(row)}"
                )
    if pairs and labelled:
        raise ValueError(f"{path}: mixes anchor/positive pairs with text/label rows; use one kind per file")
    if pairs:
        return _pairs_to_training_set(path.stem, pairs)
    if labelled:
        names = sorted({label for _, label in labelled})
        label_of = {name: i for i, name in enumerate(names)}
        return TrainingSet(path.stem, [t for t, _ in labelled], [label_of[lab] for _, lab in labelled])
    raise ValueError(f"{path}: no training rows")


def load_training_sets(names: list[str] | None = None) -> list[TrainingSet]:
    """Training sets by name (scifact, stsb, sick, banking77) or JSONL path; default: all four."""
    sets = []
    for name in names or list(TRAIN_SETS):
        if name in _BUILDERS:
            sets.append(_BUILDERS[name]())
        elif Path(name).is_file():
            sets.append(load_file(Path(name)))
        else:
            raise ValueError(
                f"unknown training data {name!r}: use one of {', '.join(TRAIN_SETS)} or a JSONL file path"
            )
    return sets
