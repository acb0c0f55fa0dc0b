"""Sparse vs dense search on a synthetic 1M-document corpus with a trained CSR head's statistics.

The corpus reproduces the head's latent firing rates and per-latent values measured on the SciFact corpus
(latents drawn independently, so it carries no topical clusters); queries are the head's real codes for the
SciFact test queries. In one run, on the same machine, it times single-query search with
- exact dense search: the decoded 384-d vectors of the same documents, numpy matrix-vector + top-k;
- exact sparse search: our inverted index (seqtopk.sparse.index, numba-compiled when available);
- approximate sparse search: pyseismic-lsr at a few pruning levels, recall@10 against the exact results;
and records latency, index memory and recall in evals/results/csr_search.{json,png}.

    .venv/bin/python evals/csr_search_bench.py --head ~/.cache/seqtopk/heads/csr-k32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import figure, save_results  # noqa: E402  (evals/ is scripts, not a package)

RESULTS = Path(__file__).resolve().parent / "results"


def head_codes(head_dir: Path, texts: list[str]):
    """The head's codes and the backbone's dense vectors for texts (backbone embeddings cached)."""
    import torch
    from sentence_transformers import SparseEncoder

    from seqtopk.sparse.backbone import CachedBackbone

    dense = CachedBackbone(head_dir).encode(texts)
    head = SparseEncoder(str(head_dir), device="cpu", local_files_only=True)[-1]
    with torch.inference_mode():
        codes = head({"sentence_embedding": torch.from_numpy(dense)})["sentence_embedding"].numpy()
    return codes, dense, head


def decode_dense(docs, head, chunk: int = 100_000) -> np.ndarray:
    """x_hat = W^T z + b_pre for every synthetic document, L2-normalised (the dense twin of each code)."""
    weight = head.encoder.weight.detach().numpy()  # (hidden, d)
    pre_bias = head.pre_bias.detach().numpy()
    out = np.empty((docs.n_rows, weight.shape[1]), dtype=np.float32)
    k = int(np.diff(docs.indptr[:2])[0])
    for start in range(0, docs.n_rows, chunk):
        end = min(start + chunk, docs.n_rows)
        idx = docs.indices[start * k : end * k].reshape(-1, k)
        val = docs.values[start * k : end * k].reshape(-1, k)
        block = np.einsum("nk,nkd->nd", val, weight[idx]) + pre_bias
        out[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def time_queries(search, queries, repeats: int = 1) -> tuple[list, float, float]:
    """Results of search(q) for each query, and mean / median single-query latency in ms (after a warm-up)."""
    search(queries[0])
    results, times = [], []
    for q in queries:
        for _ in range(repeats):
            start = time.perf_counter()
            result = search(q)
            times.append(time.perf_counter() - start)
        results.append(result)
    return results, 1000 * float(np.mean(times)), 1000 * float(np.median(times))


def seismic_space_bytes(index) -> int:
    """pyseismic prints its space usage from Rust; read it from our own stdout file descriptor."""
    import re

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 1)
        try:
            index.print_space_usage_byte()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode()
    totals = [int(n) for n in re.findall(r"[Tt]otal[^0-9]*([0-9]+)", text)]
    if not totals:
        raise RuntimeError(f"could not read pyseismic's space usage from: {text!r}")
    return max(totals)


def build_seismic(docs, n_postings: int, summary_energy: float, centroid_fraction: float):
    import seismic

    dataset = seismic.SeismicDataset()
    dataset.add_documents_by_id(
        [str(i) for i in range(docs.n_rows)], docs.indices.astype(np.int64), docs.values, docs.indptr.astype(np.int64)
    )
    start = time.perf_counter()
    index = seismic.SeismicIndex.build_from_dataset(
        dataset, n_postings=n_postings, centroid_fraction=centroid_fraction, summary_energy=summary_energy
    )
    return index, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, required=True, help="trained CSR head folder (k=32 for the recorded run)")
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300, help="SciFact test queries to use (at most 300)")
    parser.add_argument("--seismic-postings", default="6000,15000", help="pyseismic n_postings values to try (one index each)")
    parser.add_argument("--summary-energy", type=float, default=0.4)
    parser.add_argument("--centroid-fraction", type=float, default=0.1)
    parser.add_argument("--heap-factor", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=RESULTS / "csr_search")
    args = parser.parse_args()
    if not (args.head / "modules.json").is_file():
        raise SystemExit(f"{args.head} is not a head folder; train one with `seqtopk csr train --k 32 --out DIR`")

    from seqtopk.sparse.data import readers
    from seqtopk.sparse.index import InvertedIndex, SparseRows
    from seqtopk.sparse.synthetic import CodeStatistics, synthetic_corpus

    print("measuring the head's statistics on the SciFact corpus ...", flush=True)
    corpus_texts = [readers.scifact_document_text(d) for d in readers.scifact_corpus().values()]
    corpus_codes, _, head = head_codes(args.head, corpus_texts)
    stats = CodeStatistics.from_codes(SparseRows.from_dense(corpus_codes))
    query_texts = list(readers.scifact_queries("test").values())[: args.queries]
    query_codes, query_dense, _ = head_codes(args.head, query_texts)
    queries = SparseRows.from_dense(query_codes).l2_normalized()
    query_dense = query_dense / np.linalg.norm(query_dense, axis=1, keepdims=True)

    print(f"generating {args.docs:,} synthetic documents with k={stats.k} ...", flush=True)
    docs = synthetic_corpus(stats, args.docs).l2_normalized()
    dense_docs = decode_dense(docs, head)

    print("exact dense search ...", flush=True)

    def dense_search(q):
        scores = dense_docs @ q
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])]

    _, dense_mean, dense_median = time_queries(dense_search, list(query_dense))
    dense = {"dim": int(dense_docs.shape[1]), "latency_ms_mean": dense_mean, "latency_ms_median": dense_median, "index_bytes": dense_docs.nbytes}

    print("exact sparse search (our inverted index) ...", flush=True)
    inverted = InvertedIndex(docs)
    exact, sparse_mean, sparse_median = time_queries(lambda i: inverted.search(*queries.row(i), k=10)[0], list(range(queries.n_rows)))
    exact_sets = [set(r.tolist()) for r in exact]
    indexes = [
        {
            "name": "ours: exact inverted index" + (" (numba)" if inverted._kernel is not None else " (numpy)"),
            "latency_ms_mean": sparse_mean, "latency_ms_median": sparse_median, "index_bytes": inverted.nbytes,
            "recall_at_10_vs_exact_sparse": 1.0,
        }
    ]

    import seismic

    string_type = seismic.get_seismic_string()
    for n_postings in [int(n) for n in args.seismic_postings.split(",") if n]:
        print(f"pyseismic-lsr, n_postings={n_postings} ...", flush=True)
        index, build_s = build_seismic(docs, n_postings, args.summary_energy, args.centroid_fraction)

        def seismic_search(i, index=index):
            idx, val = queries.row(i)
            hits = index.search("q", idx.astype(str).astype(string_type), val.astype(np.float32), 10, len(idx), args.heap_factor)
            return [int(doc) for _, _, doc in hits]

        approx, mean, median = time_queries(seismic_search, list(range(queries.n_rows)))
        indexes.append(
            {
                "name": f"pyseismic-lsr n_postings={n_postings}",
                "latency_ms_mean": mean, "latency_ms_median": median, "index_bytes": seismic_space_bytes(index),
                "recall_at_10_vs_exact_sparse": float(np.mean([len(exact_sets[i] & set(r)) / 10 for i, r in enumerate(approx)])),
                "build_seconds": build_s,
                "params": {"n_postings": n_postings, "summary_energy": args.summary_energy, "centroid_fraction": args.centroid_fraction,
                           "heap_factor": args.heap_factor, "query_cut": stats.k},
            }
        )
        del index
    for entry in indexes:
        entry["latency_ratio_dense_over_sparse"] = dense_mean / entry["latency_ms_mean"]
        entry["memory_ratio_dense_over_sparse"] = dense["index_bytes"] / entry["index_bytes"]
        entry["meets_targets"] = (
            entry["latency_ratio_dense_over_sparse"] >= 5 and entry["memory_ratio_dense_over_sparse"] >= 5
            and entry["recall_at_10_vs_exact_sparse"] >= 0.95
        )
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "head": str(args.head), "k": stats.k, "docs": args.docs, "queries": queries.n_rows,
        "latents_ever_firing": int((stats.firing_rate > 0).sum()),
        "corpus": "each document: k latents drawn without replacement in proportion to the head's firing rates on "
        "the SciFact corpus, each value drawn from that latent's observed values; rows L2-normalised (cosine)",
        "dense": dense,
        "sparse": indexes,
    }
    save_results(result, args.out.with_suffix(".json"), plot)
    print(json.dumps(result, indent=2))
    return 0


def plot(result: dict, path: Path) -> None:
    entries = [{"name": "dense exact (numpy)", **result["dense"]}, *result["sparse"]]
    names = [textwrap.fill(e["name"], 20) for e in entries]
    with figure(path, 1, 2, figsize=(12, 4.5)) as (fig, axes):
        for ax, key, label in ((axes[0], "latency_ms_mean", "mean query latency (ms)"), (axes[1], "index_bytes", "index memory (MiB)")):
            values = [e[key] / (2**20 if key == "index_bytes" else 1) for e in entries]
            bars = ax.bar(names, values, color=["#777777"] + ["#3b7dd8"] + ["#e08a2c"] * (len(entries) - 2))
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelsize=8)
            for bar, value, e in zip(bars, values, entries):
                recall = e.get("recall_at_10_vs_exact_sparse")
                note = f"{value:.3g}" + (f"\nR@10={recall:.3f}" if recall is not None and key == "latency_ms_mean" else "")
                ax.annotate(note, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"{result['docs']:,} synthetic documents, k={result['k']}, {result['queries']} SciFact queries, one query at a time")


if __name__ == "__main__":
    sys.exit(main())
