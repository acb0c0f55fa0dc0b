"""Our exact inverted index beside Milvus (Milvus Lite, the Milvus engine in-process) and Qdrant (local mode)
on the synthetic corpus of evals/csr_search_bench.py: a trained k=32 head's firing rates and values on the
SciFact corpus, queried with the head's real codes of SciFact test queries.

For each engine, in one run on one machine: index time (everything from codes in memory to a searchable
collection: insert, flush, index build), single-query latency p50/p95 through the engine's Python client,
memory (our index's arrays and file; Milvus Lite's files on disk and its server process's RSS; Qdrant local
mode's growth of this process's RSS) and recall@10 against our exact search. Milvus runs exact
(drop_ratio_search=0) and, to state its approximation, with drop_ratio_search > 0. Qdrant's local mode is a
pure-Python reference (every query scores every point), so it runs on a smaller slice of the same corpus,
with our index on that slice beside it. Results: evals/results/vector_engine.{json,png}.

    flock /tmp/seqtopk-bench.lock .venv/bin/python evals/bench_vector_engine.py --head ~/.cache/seqtopk/heads/csr-k32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import figure, save_results  # noqa: E402  (evals/ is scripts, not a package)
from csr_search_bench import head_codes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def one_row(rows, i: int):
    from seqtopk.sparse.index import SparseRows

    idx, val = rows.row(i)
    return SparseRows(np.array([0, len(idx)], dtype=np.int64), idx, val, rows.dim)


def latencies(search, n: int) -> tuple[list, dict]:
    """search(i) for each query, one at a time after one warm-up; p50/p95/mean in ms."""
    search(0)
    results, times = [], []
    for i in range(n):
        start = time.perf_counter()
        results.append(search(i))
        times.append(time.perf_counter() - start)
    ms = 1000 * np.array(times)
    return results, {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                     "mean_ms": float(ms.mean())}


def recall(found: list[list[int]], exact: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / max(len(e), 1) for f, e in zip(found, exact)]))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rss(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def milvus_server_rss() -> int | None:
    """RSS of the Milvus Lite server process this script started (a child running the milvus binary)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        if "milvus" in child.name():
            return child.memory_info().rss
    return None


def slice_rows(rows, n: int):
    from seqtopk.sparse.index import SparseRows

    end = rows.indptr[n]
    return SparseRows(rows.indptr[: n + 1], rows.indices[:end], rows.values[:end], rows.dim)


def ours(docs, queries, k: int, work: Path) -> tuple[dict, list[list[int]]]:
    from seqtopk.sparse.index import InvertedIndex

    start = time.perf_counter()
    index = InvertedIndex(docs)
    build = time.perf_counter() - start
    index.save(work / "ours.idx")
    found, lat = latencies(lambda i: index.search(*queries.row(i), k=k)[0].tolist(), queries.n_rows)
    entry = {"engine": "ours: exact inverted index" + (" (numba)" if index._kernel is not None else " (numpy)"),
             "docs": docs.n_rows, "index_seconds": build, "memory_bytes": index.nbytes,
             "disk_bytes": (work / "ours.idx").stat().st_size, "recall_at_10_vs_ours": 1.0, **lat}
    return entry, found


def engine_run(name: str, uri: str, docs, queries, exact, k: int, info, batch_size: int,
               drop_ratios: list[float]) -> list[dict]:
    from seqtopk.sparse.export import open_engine

    doc_ids = [str(i) for i in range(docs.n_rows)]
    rss_before = rss()
    engine = open_engine(name, uri, "bench")
    start = time.perf_counter()
    engine.write(docs, doc_ids, info, batch_size=batch_size, progress=True)
    first = engine.search(one_row(queries, 0), k=k)  # the first search loads the collection: part of indexing
    index_seconds = time.perf_counter() - start
    assert first is not None
    entries = []
    for drop in drop_ratios:
        if name == "milvus":
            engine.drop_ratio_search = drop
        found, lat = latencies(lambda i: [int(h.doc_id) for h in engine.search(one_row(queries, i), k=k)[0]],
                               queries.n_rows)
        entry = {"engine": name, "uri": uri, "docs": docs.n_rows, "index_seconds": index_seconds,
                 "recall_at_10_vs_ours": recall(found, exact), **lat}
        if name == "milvus":
            entry.update(engine="milvus-lite " + _version("milvus-lite"), drop_ratio_search=drop,
                         index="SPARSE_INVERTED_INDEX, DAAT_MAXSCORE, IP", disk_bytes=folder_bytes(Path(uri).parent),
                         server_rss_bytes=milvus_server_rss())
        else:
            entry.update(engine="qdrant-client " + _version("qdrant-client") + " local mode (:memory:)",
                         process_rss_growth_bytes=rss() - rss_before)
        entries.append(entry)
        print(json.dumps(entry), flush=True)
    engine.close()
    return entries


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, required=True, help="trained CSR head folder (k=32 for the recorded run)")
    parser.add_argument("--docs", type=int, default=1_000_000, help="synthetic documents for ours and Milvus")
    parser.add_argument("--queries", type=int, default=300, help="SciFact test queries (at most 300)")
    parser.add_argument("--qdrant-docs", type=int, default=10_000, help="the slice Qdrant's local mode gets")
    parser.add_argument("--qdrant-queries", type=int, default=30, help="queries for Qdrant's local mode")
    parser.add_argument("--drop-ratios", default="0,0.2,0.5", help="Milvus drop_ratio_search values (0 = exact)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="rows per insert call")
    parser.add_argument("--skip", default="", help="comma-separated engines to leave out: milvus, qdrant")
    parser.add_argument("--out", type=Path, default=RESULTS / "vector_engine")
    args = parser.parse_args()
    if not (args.head / "modules.json").is_file():
        raise SystemExit(f"{args.head} is not a head folder; train one with `seqtopk csr train --k 32 --out DIR`")
    skip = {s for s in args.skip.split(",") if s}

    from seqtopk.sparse.data import readers
    from seqtopk.sparse.export import CodesInfo
    from seqtopk.sparse.index import SparseRows
    from seqtopk.sparse.synthetic import CodeStatistics, synthetic_corpus

    print("measuring the head's statistics on the SciFact corpus ...", flush=True)
    corpus_texts = [readers.scifact_document_text(d) for d in readers.scifact_corpus().values()]
    corpus_codes, _, _ = head_codes(args.head, corpus_texts)
    stats = CodeStatistics.from_codes(SparseRows.from_dense(corpus_codes))
    query_codes, _, _ = head_codes(args.head, list(readers.scifact_queries("test").values())[: args.queries])
    queries = SparseRows.from_dense(query_codes).l2_normalized()
    print(f"generating {args.docs:,} synthetic documents with k={stats.k} ...", flush=True)
    docs = synthetic_corpus(stats, args.docs).l2_normalized()
    info = CodesInfo(dim=docs.dim, head=args.head.name, k=stats.k)
    drops = [float(d) for d in args.drop_ratios.split(",") if d]

    runs = []
    work = Path(tempfile.mkdtemp(prefix="seqtopk-engine-bench-"))
    try:
        print("ours, full corpus ...", flush=True)
        entry, exact = ours(docs, queries, 10, work)
        runs.append(entry)
        if "milvus" not in skip:
            print(f"Milvus Lite, {docs.n_rows:,} documents ...", flush=True)
            runs += engine_run("milvus", str(work / "milvus" / "codes.db"), docs, queries, exact, 10, info,
                               args.batch_size, drops)
        if "qdrant" not in skip:
            small = slice_rows(docs, min(args.qdrant_docs, docs.n_rows))
            small_queries = slice_rows(queries, min(args.qdrant_queries, queries.n_rows))
            print(f"ours and Qdrant local mode, {small.n_rows:,} documents ...", flush=True)
            entry, small_exact = ours(small, small_queries, 10, work)
            runs.append(entry)
            runs += engine_run("qdrant", ":memory:", small, small_queries, small_exact, 10, info,
                               args.batch_size, [0.0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "head": str(args.head), "k": stats.k, "dim": docs.dim, "docs": args.docs, "queries": queries.n_rows,
        "corpus": "synthetic, as evals/csr_search_bench.py: k latents per document drawn in proportion to the head's "
        "firing rates on SciFact, values drawn from each latent's observed values, rows L2-normalised",
        "latency": "one query at a time through each engine's Python API (ours: in-process numba; Milvus Lite: "
        "pymilvus over gRPC to its local server process; Qdrant: local mode in this process)",
        "runs": runs,
    }
    save_results(result, args.out.with_suffix(".json"), plot)
    print(json.dumps(result, indent=2))
    return 0


def plot(result: dict, path: Path) -> None:
    runs = result["runs"]
    names = [f"{r['engine'].split(' (')[0].replace('ours: exact inverted index', 'ours (exact)')}"
             + (f"\ndrop={r['drop_ratio_search']}" if "drop_ratio_search" in r else "") + f"\n{r['docs']:,} docs"
             for r in runs]
    colors = ["#3b7dd8" if r["engine"].startswith("ours") else "#e08a2c" if "milvus" in r["engine"] else "#5aa05a"
              for r in runs]
    with figure(path, 1, 3, figsize=(16, 5)) as (fig, axes):
        panels = [("p50_ms", "query latency p50 (ms), p95 as whisker"), ("index_seconds", "index time (s)"),
                  ("memory", "memory (MiB)")]
        for ax, (key, label) in zip(axes, panels):
            if key == "memory":
                values = [(r.get("memory_bytes") or r.get("server_rss_bytes") or r.get("process_rss_growth_bytes") or 0)
                          / 2**20 for r in runs]
                label = "memory (MiB): ours arrays, Milvus server RSS, Qdrant RSS growth"
            else:
                values = [r[key] for r in runs]
            bars = ax.bar(range(len(runs)), values, color=colors)
            if key == "p50_ms":
                ax.errorbar(range(len(runs)), values, yerr=[[0] * len(runs), [r["p95_ms"] - r["p50_ms"] for r in runs]],
                            fmt="none", ecolor="black", capsize=3)
            ax.set_yscale("log")
            ax.set_title(label, fontsize=9)
            ax.set_xticks(range(len(runs)), names, fontsize=7)
            for bar, value, r in zip(bars, values, runs):
                note = f"{value:.3g}" + (f"\nR@10={r['recall_at_10_vs_ours']:.3f}" if key == "p50_ms" else "")
                ax.annotate(note, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=7)
        fig.suptitle(f"sparse codes (k={result['k']}, {result['dim']} latents) in vector engines vs our exact index, "
                     f"{result['queries']} SciFact queries one at a time, {result['machine']['cpus']} CPU cores")


if __name__ == "__main__":
    sys.exit(main())
