"""MTEB tasks built from the shared data folder, so that MTEB runs offline.

Each task reuses the metadata of MTEB's own task (main score, type, license...) under a "-local" name and
loads its rows from ../shared/data instead of the Hugging Face hub. Evaluation uses test splits only:
- SciFact: 300 test queries, their qrels, the 5,183-document corpus (nDCG@10).
- STS-B: sts-test.csv, 1,379 pairs (Spearman on cosine).
- SICK-R: the 4,927-pair SemEval test split. MTEB's SICK-R scores all 9,927 pairs, which would include
  the SICK train pairs our heads are trained on, so this task deliberately differs from MTEB's.
- Banking77: MTEB's protocol (logistic regression on 8 train samples per intent, 10 draws), test.csv.
"""

from __future__ import annotations

import hashlib
from typing import Any

from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.tasks.classification.eng.banking77_classification import Banking77Classification
from mteb.tasks.retrieval.eng.sci_fact_retrieval import SciFact
from mteb.tasks.sts.eng.sickr_sts import SickrSTS
from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

from seqtopk.sparse.data import readers
from seqtopk.paths import data_dir


def _local_metadata(upstream, name: str, folder: str, description: str):
    files = sorted(p for p in data_dir(folder).rglob("*") if p.is_file())
    digest = hashlib.sha256(b"".join(p.name.encode() + str(p.stat().st_size).encode() for p in files))
    return upstream.metadata.model_copy(
        update={
            "name": name,
            "description": description,
            "dataset": {"path": str(data_dir(folder)), "revision": digest.hexdigest()[:16]},
            "eval_splits": ["test"],
            "superseded_by": None,
        }
    )


class SciFactLocal(AbsTaskRetrieval):
    metadata = _local_metadata(SciFact, "SciFact-local", "scifact", "SciFact (BEIR) test queries from ../shared/data/scifact.")

    def __init__(self, extra_docs: int | None = None, **kwargs: Any) -> None:
        """extra_docs=N keeps the judged documents plus the first N others (a quick smoke corpus); None keeps all."""
        super().__init__(**kwargs)
        self.extra_docs = extra_docs

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        docs = readers.scifact_corpus()
        if self.extra_docs is not None:
            judged = {doc for docs_of_query in readers.scifact_qrels("test").values() for doc in docs_of_query}
            keep = judged | set([doc_id for doc_id in docs if doc_id not in judged][: self.extra_docs])
            docs = {doc_id: doc for doc_id, doc in docs.items() if doc_id in keep}
        queries = readers.scifact_queries("test")
        corpus = Dataset.from_dict(
            {"id": list(docs), "title": [d.get("title") or "" for d in docs.values()], "text": [d.get("text") or "" for d in docs.values()]}
        )
        query_set = Dataset.from_dict({"id": list(queries), "text": list(queries.values())})
        split = RetrievalSplitData(corpus=corpus, queries=query_set, relevant_docs=readers.scifact_qrels("test"), top_ranked=None)
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


def _sts_dataset(pairs: list[tuple[str, str, float]]) -> Dataset:
    return Dataset.from_dict(
        {"sentence1": [a for a, _, _ in pairs], "sentence2": [b for _, b, _ in pairs], "score": [s for _, _, s in pairs]}
    )


class _LocalSTS(AbsTaskSTS):
    """An STS task whose test pairs come from a seqtopk.sparse.data.readers function (`read_pairs`)."""

    read_pairs = None  # split name -> [(sentence1, sentence2, score)]

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = {"default": {"test": _sts_dataset(type(self).read_pairs("test"))}}
        self.data_loaded = True


class STSBenchmarkLocal(_LocalSTS):
    metadata = _local_metadata(STSBenchmarkSTS, "STSBenchmark-local", "stsbenchmark", "STS Benchmark test pairs from ../shared/data.")
    min_score = 0
    max_score = 5
    read_pairs = readers.stsb_pairs


class SickRTestLocal(_LocalSTS):
    metadata = _local_metadata(
        SickrSTS, "SICK-R-test-local", "sick", "SICK relatedness, SemEval-2014 test split only (4,927 pairs), from ../shared/data."
    )
    min_score = 1
    max_score = 5
    read_pairs = readers.sick_pairs


class Banking77Local(AbsTaskClassification):
    metadata = _local_metadata(
        Banking77Classification, "Banking77Classification-local", "banking77", "Banking77 intents (official release) from ../shared/data."
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        intents = sorted({intent for _, intent in readers.banking77_rows("train")})
        label_of = {intent: i for i, intent in enumerate(intents)}

        def split(name: str) -> Dataset:
            rows = readers.banking77_rows(name)
            return Dataset.from_dict({"text": [t for t, _ in rows], "label": [label_of[i] for _, i in rows]})

        self.dataset = {"default": DatasetDict({"train": split("train"), "test": split("test")})}
        self.data_loaded = True


TASKS = {
    "scifact": SciFactLocal,
    "stsb": STSBenchmarkLocal,
    "sickr": SickRTestLocal,
    "banking77": Banking77Local,
}


def local_tasks(names: list[str] | None = None) -> list:
    """Task instances by short name (scifact, stsb, sickr, banking77); default all four."""
    unknown = sorted(set(names or []) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return [TASKS[name]() for name in (names or list(TASKS))]
