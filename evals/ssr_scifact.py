"""SSR on SciFact test, side by side with the baselines that share its backbone (all-MiniLM-L6-v2).

One run, same token vectors for every late-interaction system (cached backbone token outputs):
- exact dense MaxSim over all document token vectors (what SSR approximates; brute force, no index);
- PLAID as its users run it: lightonai's fast-plaid with its own defaults, in its own venv
  (evals/anchors/, made on demand), on the same token vectors exported once to .npy files; its rankings
  come back as document numbers and are scored here by the same evaluator;
- a k-means centroid index (faiss k-means over the document token vectors, inverted lists by centroid,
  probe n centroids per query token, exact dense MaxSim over the candidates' tokens: PLAID/ColBERTv1);
- SSR exhaustive exact MaxSim from the inverted index, and SSR two-stage (pool, then exact);
- the single-vector dense MiniLM (brute-force cosine) and, when a trained CSR head is given, its sparse
  inverted index, for reference.
For each: nDCG@10 (MTEB's retrieval evaluator), index build time, index bytes, p50/p95 query latency.
Build times exclude the backbone (shared by all); query latency excludes query encoding (shared too).
Every system runs with the same 2 threads. Timed: run it under `flock -x /tmp/seqtopk-bench.lock`; the load
average before and after is recorded. Writes evals/results/ssr_scifact.{json,png}.

    .venv/bin/python evals/ssr_scifact.py --ssr ~/.cache/seqtopk/ssr/ssr-k32-h4096 [--csr HEAD_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from seqtopk.sparse.ssr.baselines import KMeansIndex, dense_maxsim_scores
from seqtopk.sparse.ssr.evaluate import latency_summary, retrieval_scores, run_queries, scifact_test
from seqtopk.sparse.ssr.index import DEFAULT_PROBE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import figure, save_results  # noqa: E402  (evals/ is scripts, not a package)

RESULTS = Path(__file__).parent / "results"
ANCHORS = Path(__file__).parent / "anchors"
THREADS = 2


def run_dense_maxsim(queries, doc_vectors, doc_offsets, data, k):
    starts = doc_offsets[:-1]

    def search(q):
        scores = dense_maxsim_scores(q, doc_vectors, starts)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return best, scores[best]

    results, lat, _ = run_queries(search, queries, data.query_ids, data.doc_ids)
    return {"system": "dense MaxSim (exact, brute force)", **retrieval_scores(results, data.qrels),
            **latency_summary(lat), "index_build_s": 0.0, "index_bytes": int(doc_vectors.nbytes)}


def run_plaid(doc_tokens, query_tokens, data, k):
    """fast-plaid in its own venv on the same token vectors; rankings scored by our evaluator."""
    sys.path.insert(0, str(ANCHORS))
    from plaid_venv import plaid_python

    python = plaid_python()
    with tempfile.TemporaryDirectory(prefix="ssr-plaid-") as tmp:
        tokens = Path(tmp)
        np.save(tokens / "doc_vectors.npy", doc_tokens.vectors.astype(np.float16))  # as cached: float16
        np.save(tokens / "doc_offsets.npy", doc_tokens.offsets)
        np.save(tokens / "query_vectors.npy", query_tokens.vectors)
        np.save(tokens / "query_offsets.npy", query_tokens.offsets)
        out = tokens / "plaid.json"
        subprocess.run([str(python), str(ANCHORS / "plaid_run.py"), str(tokens), "--out", str(out), "--top-k", str(k),
                        "--threads", str(THREADS)], check=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        plaid = json.loads(out.read_text())
    results = {qid: {data.doc_ids[d]: s for d, s in ranking} for qid, ranking in zip(data.query_ids, plaid["rankings"])}
    settings = plaid["settings"]
    return {"system": f"PLAID (fast-plaid {plaid['fast_plaid']}, {settings['centroids']} centroids, nbits="
                      f"{settings['nbits']}, n_ivf_probe={settings['n_ivf_probe']}, n_full_scores={settings['n_full_scores']})",
            **retrieval_scores(results, data.qrels), **latency_summary(np.array(plaid["latencies_ms"])),
            "index_build_s": plaid["build_s"], "index_bytes": plaid["index_bytes"], "plaid_settings": settings,
            "plaid_torch": plaid["torch"]}


def run_single_vector(backbone, data, k):
    from seqtopk.sparse.backbone import CachedBackbone

    model = CachedBackbone(backbone)
    docs = model.encode(data.doc_texts, desc="dense docs")
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    qs = model.encode(data.query_texts, desc="dense queries")
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)

    def search(q):
        scores = docs @ q
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return best, scores[best]

    results, lat, _ = run_queries(search, list(qs), data.query_ids, data.doc_ids)
    return {"system": "single-vector dense MiniLM (brute force)", **retrieval_scores(results, data.qrels),
            **latency_summary(lat), "index_build_s": 0.0, "index_bytes": int(docs.nbytes)}


def run_csr(head, data, k):
    import torch

    from seqtopk.sparse.backbone import CachedBackbone
    from seqtopk.sparse.index import InvertedIndex, SparseRows
    from seqtopk.sparse.mteb.models import CSRHeadModel

    model = CSRHeadModel(head, CachedBackbone(head))
    docs = model.encode_texts(data.doc_texts)
    queries = model.encode_texts(data.query_texts)
    docs = torch.nn.functional.normalize(docs, dim=-1).numpy()  # the head is trained for cosine
    queries = torch.nn.functional.normalize(queries, dim=-1).numpy()
    start = time.perf_counter()
    index = InvertedIndex(SparseRows.from_dense(docs))
    build = time.perf_counter() - start
    rows = SparseRows.from_dense(queries)
    index.search(*rows.row(0), k)  # compile once, outside the timing
    results, lat, _ = run_queries(lambda i: index.search(*rows.row(i), k), list(range(rows.n_rows)), data.query_ids, data.doc_ids)
    return {"system": f"CSR head {Path(head).name} (single-vector sparse)", **retrieval_scores(results, data.qrels),
            **latency_summary(lat), "index_build_s": build, "index_bytes": int(index.nbytes)}


def sae_time_split(sae, vectors16: np.ndarray, rows: int = 65536) -> dict:
    """Where SAE encoding spends its time, on the first `rows` token vectors: cast, GEMM, top-k, the rest."""
    import torch

    x16 = vectors16[:rows]
    with torch.inference_mode():
        t0 = time.perf_counter()
        x = torch.from_numpy(x16.astype(np.float32))
        t1 = time.perf_counter()
        pre = [sae.pre_activations(x[a:a + 2048]) for a in range(0, len(x), 2048)]
        t2 = time.perf_counter()
        for p in pre:
            p.topk(sae.k, dim=-1, sorted=False)
        t3 = time.perf_counter()
    whole = time.perf_counter()
    sae.sparse_codes(x16)
    whole = time.perf_counter() - whole
    return {"rows": len(x16), "total_s": whole, "cast_s": t1 - t0, "gemm_s": t2 - t1, "topk_s": t3 - t2,
            "rest_s": max(0.0, whole - (t3 - t0)), "gemm_gflops": 2 * len(x16) * sae.input_dim * sae.hidden_dim / (t2 - t1) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ssr", type=Path, required=True, help="trained SSR folder")
    parser.add_argument("--csr", type=Path, default=None, help="a trained CSR head folder, for reference")
    parser.add_argument("--centroids", type=int, default=1024, help="k-means centroids")
    parser.add_argument("--niter", type=int, default=10, help="k-means iterations")
    parser.add_argument("--nprobe", default="1,4", help="centroids probed per query token")
    parser.add_argument("--pools", default="30,100,300", help="SSR two-stage pool sizes")
    parser.add_argument("--probe", type=int, default=DEFAULT_PROBE, help="SSR first stage: strongest latents per query token")
    parser.add_argument("--no-plaid", action="store_true", help="skip the PLAID anchor (its venv is made on demand)")
    parser.add_argument("--queries", type=int, default=None, help="first N queries only (quick runs)")
    parser.add_argument("--extra-docs", type=int, default=None, help="judged docs + first N others (quick runs)")
    parser.add_argument("--tag", default="ssr_scifact", help="output name under evals/results/")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    import torch

    torch.set_num_threads(THREADS)
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.index.multivector import MultiVectorIndex
    from seqtopk.sparse.ssr.encoder import SSREncoder
    from seqtopk.sparse.ssr.train import read_summary

    k = 100
    data = scifact_test()
    if args.queries or args.extra_docs is not None:
        data = data.head(args.queries, args.extra_docs)
    encoder = SSREncoder(args.ssr)
    doc_tokens = encoder.tokens.encode(data.doc_texts, "document", progress=True)
    query_tokens = encoder.tokens.encode(data.query_texts, "query", progress=True)
    queries = [query_tokens.text(i) for i in range(len(query_tokens))]
    rows = []

    print("dense MaxSim ...", flush=True)
    rows.append(run_dense_maxsim(queries, doc_tokens.vectors, doc_tokens.offsets, data, k))

    if not args.no_plaid:
        print("PLAID (fast-plaid, its own venv) ...", flush=True)
        rows.append(run_plaid(doc_tokens, query_tokens, data, k))

    print("k-means index ...", flush=True)
    km = KMeansIndex(doc_tokens.vectors, doc_tokens.offsets, args.centroids, args.niter)
    for nprobe in [int(n) for n in args.nprobe.split(",")]:
        results, lat, _ = run_queries(lambda q: km.search(q, k, nprobe), queries, data.query_ids, data.doc_ids)
        rows.append({"system": f"k-means index ({args.centroids} centroids, nprobe={nprobe})", "nprobe": nprobe,
                     **retrieval_scores(results, data.qrels), **latency_summary(lat), "index_build_s": km.build_s,
                     "kmeans_train_s": km.train_s, "index_bytes": km.nbytes})
    del km

    print("SSR ...", flush=True)
    vectors16 = doc_tokens.vectors.astype(np.float16)  # what SSRIndex.build reads from the cache
    start = time.perf_counter()
    codes = encoder.sae.sparse_codes(vectors16)
    coded = time.perf_counter()
    index = MultiVectorIndex(codes, doc_tokens.offsets, data.doc_ids, doc_tokens.token_ids)
    built = time.perf_counter()
    split = sae_time_split(encoder.sae, vectors16)
    q_codes = [encoder.sae.sparse_codes(q) for q in queries]
    index.search(q_codes[0], k)  # compile the kernels once, outside the timing
    index.search(q_codes[0], 10, pool=30, probe=args.probe)
    build = {"index_build_s": built - start, "sae_codes_s": coded - start, "inverted_lists_s": built - coded,
             "index_bytes": int(index.nbytes)}
    results, lat, exhaustive = run_queries(lambda q: index.search(q, k), q_codes, data.query_ids, data.doc_ids)
    rows.append({"system": "SSR exhaustive exact MaxSim", **retrieval_scores(results, data.qrels),
                 **latency_summary(lat), **build})
    for pool in [int(p) for p in args.pools.split(",")]:
        results, lat, ranked = run_queries(lambda q: index.search(q, min(k, pool), pool=pool, probe=args.probe),
                                           q_codes, data.query_ids, data.doc_ids)
        recall = float(np.mean([len(set(r[:10]) & set(e[:10])) / max(1, min(10, len(e))) for r, e in zip(ranked, exhaustive)]))
        rows.append({"system": f"SSR two-stage (pool {pool}, {args.probe} latents/token)", "pool": pool,
                     "pool_recall_at_10": recall, **retrieval_scores(results, data.qrels), **latency_summary(lat), **build})

    print("single-vector references ...", flush=True)
    rows.append(run_single_vector(default_backbone(), data, k))
    if args.csr:
        rows.append(run_csr(args.csr, data, k))

    summary = read_summary(args.ssr)
    out = {"load_average_start_end": [load_at_start, os.getloadavg()], "threads": THREADS,
           "docs": len(data.doc_ids), "queries": len(data.query_ids), "doc_tokens": int(len(doc_tokens.vectors)),
           "ssr": {"folder": str(args.ssr), "k": encoder.sae.k, "latents": encoder.sae.hidden_dim,
                   "dead_latent_fraction_heldout": summary.get("dead_latent_fraction_heldout"),
                   "train_steps": summary.get("config", {}).get("max_steps"), "sae_time_split": split},
           "kmeans": {"centroids": args.centroids, "niter": args.niter},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "targets": targets(rows), "rows": rows}
    save_results(out, RESULTS / f"{args.tag}.json", plot)
    for r in rows:
        print(f"{r['system']:55s} nDCG@10 {r['ndcg_at_10']:5.1f}  build {r['index_build_s']:7.1f} s  "
              f"{r['index_bytes'] / 2**20:8.1f} MiB  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms")
    print(json.dumps(out["targets"], indent=2))


def targets(rows: list[dict]) -> dict:
    """The issue's three targets, each as measured: SSR exhaustive against dense MaxSim and PLAID."""
    by = {r["system"].split(" (")[0]: r for r in rows}
    ssr, dense, plaid = by.get("SSR exhaustive exact MaxSim"), by.get("dense MaxSim"), by.get("PLAID")
    two_stage = [r for r in rows if r["system"].startswith("SSR two-stage")]
    out = {"ndcg_gap_to_dense_maxsim_points": ssr["ndcg_at_10"] - dense["ndcg_at_10"], "ndcg_target_points": -1.0}
    if plaid:
        out.update({"p50_ratio_ssr_exhaustive_to_plaid": ssr["p50_ms"] / plaid["p50_ms"],
                    "p50_ratio_best_two_stage_to_plaid": min(r["p50_ms"] for r in two_stage) / plaid["p50_ms"] if two_stage else None,
                    "p50_ratio_target": 0.5,
                    "build_speedup_plaid_over_ssr": plaid["index_build_s"] / ssr["index_build_s"], "build_speedup_target": 5.0})
    return out


def plot(out: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]}) as (fig, (ax1, ax2)):
        for r in out["rows"]:
            ax1.scatter(r["p50_ms"], r["ndcg_at_10"], s=40, label=r["system"].replace(" exact MaxSim", ""))
        ax1.set_xscale("log")
        ax1.set_xlabel("p50 query latency (ms, log)")
        ax1.set_ylabel("SciFact nDCG@10")
        ax1.set_title(f"SciFact test: {out['queries']} queries, {out['docs']:,} docs, {out['doc_tokens']:,} doc tokens",
                      fontsize=10)
        ax1.legend(fontsize=6.5, loc="lower right")
        builds = {}
        for r in out["rows"]:  # one bar per index (two-stage search shares SSR's index)
            if r["index_build_s"] > 0:
                builds.setdefault(r["system"].split(" (")[0].replace(" two-stage", " exhaustive exact MaxSim"), r["index_build_s"])
        names = list(builds)
        bars = ax2.barh(names, [builds[n] for n in names])
        ax2.bar_label(bars, fmt="%.0f s", fontsize=8)
        ax2.set_xlabel("index build time (s; backbone excluded)")
        load = out["load_average_start_end"]
        ax2.set_title(f"{out['threads']} threads; load average {load[0][0]:.1f} before, {load[1][0]:.1f} after", fontsize=9)


if __name__ == "__main__":
    main()
