"""SciFact test (300 queries, 5,183 documents) for late-interaction retrievers, scored by MTEB's evaluator.

Rankings come from our indexes; nDCG@10 and recall come from mteb's `calculate_retrieval_scores` (the
pytrec_eval code MTEB's retrieval tasks run), on the test qrels of ../shared/data/scifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqtopk.sparse.ssr.index import DEFAULT_PROBE


@dataclass
class RetrievalSet:
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]

    def head(self, queries: int | None = None, docs: int | None = None) -> "RetrievalSet":
        """A slice for quick runs: the first `queries` queries, their judged documents plus the first others."""
        qids = self.query_ids[:queries] if queries else self.query_ids
        texts = dict(zip(self.query_ids, self.query_texts))
        judged = {d for q in qids for d in self.qrels.get(q, {})}
        keep = [i for i, d in enumerate(self.doc_ids) if d in judged]
        if docs:
            keep = sorted(set(keep) | set([i for i, d in enumerate(self.doc_ids) if d not in judged][:docs]))
        return RetrievalSet([self.doc_ids[i] for i in keep], [self.doc_texts[i] for i in keep], qids,
                            [texts[q] for q in qids], {q: self.qrels[q] for q in qids})


def scifact_test() -> RetrievalSet:
    from seqtopk.sparse.data import readers

    corpus = readers.scifact_corpus()
    queries = readers.scifact_queries("test")
    return RetrievalSet(list(corpus), [readers.scifact_document_text(d) for d in corpus.values()], list(queries),
                        list(queries.values()), readers.scifact_qrels("test"))


def retrieval_scores(results: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict:
    """nDCG@10, recall@10 and recall@100 (in %) by MTEB's retrieval evaluator."""
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    scores = calculate_retrieval_scores(results, qrels, [10, 100])
    return {"ndcg_at_10": 100 * scores.ndcg["NDCG@10"], "recall_at_10": 100 * scores.recall["Recall@10"],
            "recall_at_100": 100 * scores.recall["Recall@100"]}


def run_queries(search, queries, query_ids: list[str], doc_ids: list[str]) -> tuple[dict, np.ndarray, list]:
    """Run `search(query) -> (doc numbers, scores)` for each query: MTEB-style results, latencies (ms), rankings."""
    results, latencies, rankings = {}, [], []
    for qid, query in zip(query_ids, queries):
        start = time.perf_counter()
        docs, scores = search(query)
        latencies.append(1000 * (time.perf_counter() - start))
        results[qid] = {doc_ids[d]: float(s) for d, s in zip(docs, scores)}
        rankings.append(np.asarray(docs))
    return results, np.array(latencies), rankings


def latency_summary(latencies_ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(latencies_ms, 50)), "p95_ms": float(np.percentile(latencies_ms, 95))}


def evaluate_ssr(folder: Path, data: RetrievalSet | None = None, pools: tuple = (None,),
                 probe: int | None = DEFAULT_PROBE, top: int = 100, progress: bool = False) -> dict:
    """Build an SSR index over the corpus and score the queries exhaustively (pool None) and two-stage, whose
    first stage walks the `probe` strongest latents of each query token (None: all of them)."""
    from seqtopk.sparse.ssr.encoder import SSREncoder
    from seqtopk.sparse.ssr.index import SSRIndex
    from seqtopk.sparse.ssr.train import read_summary

    data = data or scifact_test()
    encoder = SSREncoder(folder)
    ssr, timings = SSRIndex.build(folder, data.doc_ids, data.doc_texts, progress=progress, encoder=encoder)
    query_codes = encoder.encode(data.query_texts, "query")
    queries = [query_codes.text(i) for i in range(len(query_codes))]
    summary = read_summary(folder)
    out = {"model": str(folder), "k": encoder.sae.k, "latents": encoder.sae.hidden_dim,
           "dead_latent_fraction_heldout": summary.get("dead_latent_fraction_heldout"),
           "docs": len(data.doc_ids), "queries": len(data.query_ids), "doc_tokens": ssr.index.n_tokens,
           "index_bytes": ssr.index.nbytes, **timings, "runs": []}
    exhaustive = None
    for pool in pools:
        ranked_top = top if pool is None else min(top, pool)
        results, latencies, rankings = run_queries(
            lambda q: ssr.index.search(q, ranked_top, pool=pool, probe=probe), queries, data.query_ids, data.doc_ids)
        run = {"pool": pool, "probe": probe, **retrieval_scores(results, data.qrels), **latency_summary(latencies)}
        if pool is None:
            exhaustive = rankings
        elif exhaustive is not None:
            run["pool_recall_at_10"] = float(np.mean(
                [len(set(r[:10]) & set(e[:10])) / max(1, min(10, len(e))) for r, e in zip(rankings, exhaustive)]))
        out["runs"].append(run)
    return out
