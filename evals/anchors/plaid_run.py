"""PLAID (lightonai's fast-plaid) with its own defaults, on token vectors exported by evals/ssr_scifact.py.

Runs inside evals/anchors/.venv-plaid (plaid_venv.py) and imports nothing of seqtopk. Reads TOKENS/:
doc_vectors.npy (float16, unit rows), doc_offsets.npy, query_vectors.npy, query_offsets.npy (text i owns
rows offsets[i]:offsets[i+1]). Builds an index with `FastPlaid.create` defaults (centroids derived from the
corpus size, 4 k-means iterations, nbits=4), then searches one query at a time with `search` defaults
(n_ivf_probe=8, n_full_scores=4096) and writes OUT (JSON): build seconds, index bytes on disk, per-query
latency in ms, and each query's top-k (document number, score).

    .venv-plaid/bin/python plaid_run.py TOKENS --out plaid.json [--top-k 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokens", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from fast_plaid import search

    doc_vectors = np.load(args.tokens / "doc_vectors.npy", mmap_mode="r")
    doc_offsets = np.load(args.tokens / "doc_offsets.npy")
    query_vectors = np.load(args.tokens / "query_vectors.npy")
    query_offsets = np.load(args.tokens / "query_offsets.npy")
    docs = [torch.from_numpy(np.array(doc_vectors[a:b], dtype=np.float16)) for a, b in zip(doc_offsets[:-1], doc_offsets[1:])]
    queries = [torch.from_numpy(query_vectors[a:b].astype(np.float32)) for a, b in zip(query_offsets[:-1], query_offsets[1:])]
    n_tokens = int(doc_offsets[-1])
    where = Path(tempfile.mkdtemp(prefix="plaid-anchor-"))
    try:
        start = time.perf_counter()
        index = search.FastPlaid(index=str(where / "index"), device="cpu")
        index.create(documents_embeddings=docs)
        build_s = time.perf_counter() - start
        index_bytes = folder_bytes(where / "index")
        centroids = int(np.load(where / "index" / "centroids.npy", mmap_mode="r").shape[0])
        index.search(queries_embeddings=queries[0][None], top_k=args.top_k, show_progress=False)  # load, outside timing
        latencies, rankings = [], []
        for q in queries:
            start = time.perf_counter()
            hits = index.search(queries_embeddings=q[None], top_k=args.top_k, show_progress=False)[0]
            latencies.append(1000 * (time.perf_counter() - start))
            rankings.append([[int(doc), float(score)] for doc, score in hits])
    finally:
        shutil.rmtree(where, ignore_errors=True)
    args.out.write_text(json.dumps({
        "fast_plaid": __import__("importlib.metadata").metadata.version("fast-plaid"), "torch": torch.__version__,
        "settings": {"kmeans_niters": 4, "nbits": 4, "n_ivf_probe": 8, "n_full_scores": 4096,
                     "centroids": centroids},
        "threads": args.threads, "docs": len(docs), "doc_tokens": n_tokens, "build_s": build_s,
        "index_bytes": index_bytes, "latencies_ms": latencies, "rankings": rankings}) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
