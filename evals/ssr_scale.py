"""SSR at scale: index build time and query latency vs a k-means centroid index, on >= 2M token vectors.

The corpus is resampled from real text: SciFact train documents drawn with replacement until there are
`--tokens` token vectors, every vector jittered (Gaussian noise, 0.01 per dimension, renormalised), so the
SAE's codes keep the trained SAE's statistics on real text (same latents, same values, same document
lengths) at any size. SSR build = SAE encoding of the vectors + inverted lists (with `--encode-sample N`
the encoding is timed on the first N vectors and scaled linearly, and the index holds the real rows'
codes); k-means build = faiss k-means training + assigning every vector. Queries: real SciFact test query
tokens. No relevance labels exist here, so quality is SSR two-stage's overlap with SSR exhaustive search.
Timed: wrap in `flock /tmp/seqtopk-bench.lock`. Writes evals/results/ssr_scale.{json,png}.

    .venv/bin/python evals/ssr_scale.py --ssr ~/.cache/seqtopk/ssr/ssr-k32-h4096 --tokens 2000000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from seqtopk.sparse.ssr.baselines import KMeansIndex
from seqtopk.sparse.ssr.evaluate import latency_summary
from seqtopk.sparse.ssr.index import DEFAULT_PROBE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import figure, save_results  # noqa: E402  (evals/ is scripts, not a package)

RESULTS = Path(__file__).parent / "results"


def take_rows(codes, rows: np.ndarray):
    """SparseRows of the given rows of `codes`, in that order."""
    from seqtopk.sparse.index.rows import SparseRows

    lengths = np.diff(codes.indptr)[rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    entries = np.repeat(codes.indptr[rows] - indptr[:-1], lengths) + np.arange(int(indptr[-1]))
    return SparseRows(indptr, codes.indices[entries], codes.values[entries], codes.dim)


def timed_queries(search, queries) -> tuple[np.ndarray, list]:
    latencies, rankings = [], []
    for q in queries:
        start = time.perf_counter()
        ids, _ = search(q)
        latencies.append(1000 * (time.perf_counter() - start))
        rankings.append(ids)
    return np.array(latencies), rankings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ssr", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="synthetic document tokens (at least)")
    parser.add_argument("--centroids", type=int, default=2048)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--pool", type=int, default=100)
    parser.add_argument("--probe", type=int, default=DEFAULT_PROBE)
    parser.add_argument("--nprobe", default="1,2,4")
    parser.add_argument("--encode-sample", type=int, default=None,
                        help="time the SAE encoding on the first N rows and scale it (default: encode all)")
    parser.add_argument("--tag", default="ssr_scale")
    args = parser.parse_args()
    load_at_start = __import__("os").getloadavg()

    from tqdm.auto import tqdm

    from seqtopk.sparse.index.multivector import MultiVectorIndex
    from seqtopk.sparse.ssr.encoder import SSREncoder
    from seqtopk.sparse.ssr.evaluate import scifact_test
    from seqtopk.sparse.synthetic import CodeStatistics

    from seqtopk.sparse.ssr.train import training_pairs

    data = scifact_test()
    encoder = SSREncoder(args.ssr)
    # Statistics from real document tokens: SciFact train documents (test documents stay out of it).
    real = encoder.tokens.encode(training_pairs()[1], "document")
    real_codes = encoder.sae.sparse_codes(real.vectors)
    # Synthetic documents: real SciFact train documents drawn with replacement until `--tokens`, each token
    # vector jittered (Gaussian, 0.01 per dimension, renormalised) so no two are equal. Latent firing rates
    # and values are then the trained SAE's on real text (checked below against the real codes).
    rng = np.random.default_rng(0)
    real_lengths = np.diff(real.offsets)
    picks = rng.integers(0, len(real_lengths), size=args.tokens // int(real_lengths.min() or 1) + 1)
    picks = picks[: np.searchsorted(np.cumsum(real_lengths[picks]), args.tokens) + 1]
    lengths = real_lengths[picks]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = np.concatenate([np.arange(real.offsets[d], real.offsets[d + 1]) for d in picks])
    n_tokens = int(offsets[-1])
    print(f"synthetic: {n_tokens:,} tokens in {len(lengths):,} documents", flush=True)
    dense = real.vectors[rows]
    for start in tqdm(range(0, n_tokens, 500_000), desc="jitter"):
        block = dense[start:start + 500_000]
        block += rng.normal(scale=0.01, size=block.shape).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    stats = CodeStatistics.from_codes(real_codes)

    queries = encoder.tokens.encode(data.query_texts[: args.queries], "query")
    q_dense = [queries.text(i) for i in range(len(queries))]
    q_codes = [encoder.sae.sparse_codes(q) for q in q_dense]

    results = []
    print("SSR build ...", flush=True)
    # SAE encoding is row-independent, so its time is linear in the rows: with --encode-sample N only the
    # first N rows are encoded and timed, and the index holds the real rows' codes (jitter aside, the same).
    sample = min(args.encode_sample or n_tokens, n_tokens)
    start = time.perf_counter()
    sample_codes = encoder.sae.sparse_codes(dense[:sample], chunk=16384)
    encode_s = (time.perf_counter() - start) * n_tokens / sample
    ssr_codes = sample_codes if sample == n_tokens else take_rows(real_codes, rows)
    start = time.perf_counter()
    index = MultiVectorIndex(ssr_codes, offsets)
    invert_s = time.perf_counter() - start
    sample_check = sample_codes
    del ssr_codes
    index.search(q_codes[0], 10)
    index.search(q_codes[0], 10, pool=args.pool, probe=args.probe)
    build = {"index_build_s": encode_s + invert_s, "sae_codes_s": encode_s, "inverted_lists_s": invert_s,
             "sae_codes_timed_rows": sample, "index_bytes": int(index.nbytes)}
    lat, exhaustive = timed_queries(lambda q: index.search(q, 10), q_codes)
    results.append({"system": "SSR exhaustive exact MaxSim", **latency_summary(lat), **build})
    lat, ranked = timed_queries(lambda q: index.search(q, 10, pool=args.pool, probe=args.probe), q_codes)
    recall = float(np.mean([len(set(r) & set(e)) / max(1, len(e)) for r, e in zip(ranked, exhaustive)]))
    results.append({"system": f"SSR two-stage (pool {args.pool}, {args.probe} latents/token)", "pool_recall_at_10": recall,
                 **latency_summary(lat), **build})
    index = None  # free the postings before k-means

    print("k-means build ...", flush=True)
    km = KMeansIndex(dense, offsets, args.centroids, args.niter)
    for nprobe in [int(n) for n in args.nprobe.split(",")]:
        lat, _ = timed_queries(lambda q: km.search(q, 10, nprobe), q_dense)
        results.append({"system": f"k-means index ({args.centroids} centroids, nprobe={nprobe})", **latency_summary(lat),
                     "index_build_s": km.build_s, "kmeans_train_s": km.train_s, "index_bytes": km.nbytes})

    out = {"load_average_start_end": [load_at_start, __import__("os").getloadavg()], "tokens": n_tokens, "real_tokens_resampled": int(real_codes.n_rows), "jitter_std": 0.01,
           "timed_sample_codes_match_real": float(np.mean(
               [set(sample_check.row(i)[0]) == set(real_codes.row(rows[i])[0]) for i in range(1000)])),
           "latents_firing_on_real": int((stats.firing_rate > 0).sum()), "docs": len(lengths), "latents": encoder.sae.hidden_dim, "k": encoder.sae.k,
           "queries": len(q_codes), "centroids": args.centroids, "niter": args.niter, "rows": results}
    save_results(out, RESULTS / f"{args.tag}.json", plot)
    for r in results:
        print(f"{r['system']:50s} build {r['index_build_s']:7.1f} s  {r['index_bytes'] / 2**20:8.1f} MiB  "
              f"p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms")


def plot(out: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(12, 4.5)) as (fig, (ax1, ax2)):
        names = [r["system"] for r in out["rows"]]
        ax1.barh(names, [r["p50_ms"] for r in out["rows"]], label="p50")
        ax1.barh(names, [r["p95_ms"] - r["p50_ms"] for r in out["rows"]], left=[r["p50_ms"] for r in out["rows"]],
                 alpha=0.4, label="p95")
        ax1.set_xlabel("query latency (ms)")
        ax1.legend()
        ax1.tick_params(axis="y", labelsize=7)
        first = {}
        for r in out["rows"]:
            first.setdefault(r["system"].split(" (")[0].replace(" exhaustive exact MaxSim", "").replace(" two-stage", ""), r["index_build_s"])
        ax2.bar(list(first), list(first.values()))
        ax2.set_ylabel("index build time (s)")
        fig.suptitle(f"{out['tokens']:,} synthetic tokens, {out['docs']:,} docs, SSR h={out['latents']} k={out['k']}")


if __name__ == "__main__":
    main()
