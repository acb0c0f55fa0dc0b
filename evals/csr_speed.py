"""Encode and search speed of CSRv2 at k=2 against the dense embedding and the MRL-32 reference, on SciFact.

The CSRv2 paper's claim is that k=2 codes keep quality at a fraction of the cost; evals/csr_mteb_sweep.py scores
the quality, this script times the cost, in one process on the same machine:
- encode: texts per second for the first --encode-texts SciFact corpus texts (batch 32), the three models taking
  turns round by round (A B C, B C A, ...), median over --rounds. The fine-tuned CSRv2 folder carries its own
  backbone (same architecture as the dense one), so this is the dense encoder plus the head;
- search: the SciFact corpus (--docs documents, all 5,183 by default; a smaller one keeps the judged documents of
  the queries) and its test queries encoded once by each
  model (through the backbone's embedding cache, untimed), then exact top-10 search one query at a time: dense 384-d and MRL-32 by numpy (matrix-vector, then
  argpartition), CSRv2 k=2 by seqtopk's exact inverted index (numba). Median and mean latency, index bytes, and
  nDCG@10 against SciFact's test qrels (a check that the timed encodings are the ones the sweep scores).
Heads come from the sweep's work dir: csrv2-ft-k2-seed{S} and mrl-k32-seed{S} (or --csr / --mrl folders).

    python evals/csr_speed.py                                  # seed 0's heads, every SciFact document
    python evals/csr_speed.py --docs 500 --queries 50 --rounds 1

Writes evals/results/csr_speed.json and a PNG next to it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import figure, save_results  # noqa: E402  (evals/ is scripts, not a package)

MODELS = ("dense 384-d", "MRL-32", "CSRv2 k=2")


def load_models(csr: Path, mrl: Path) -> dict:
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from seqtopk.sparse.backbone import default_backbone

    return {"dense 384-d": SentenceTransformer(str(default_backbone()), device="cpu", local_files_only=True),
            "MRL-32": SentenceTransformer(str(mrl), device="cpu", local_files_only=True),
            "CSRv2 k=2": SparseEncoder(str(csr), device="cpu", local_files_only=True)}


def index_vectors(name: str, folder: Path, model, texts: list[str]) -> np.ndarray:
    """What `encode` gives, through the backbone's on-disk embedding cache (the sweep filled it for SciFact) and
    the folder's last module, L2-normalised (all three folders score by cosine, as the sweep's MTEB runs do): the
    search's inputs, not timed."""
    import torch

    from seqtopk.sparse.backbone import CachedBackbone

    vectors = CachedBackbone(folder).encode(texts)
    if name != MODELS[0]:
        with torch.inference_mode():
            out = model[-1]({"sentence_embedding": torch.from_numpy(vectors)})["sentence_embedding"]
        vectors = (out.to_dense() if out.is_sparse else out).float().numpy()
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def encode(model, texts: list[str]) -> np.ndarray:
    """Dense float32 [n, d] (a sparse model's codes densified: they are indexed as sparse rows after)."""
    import torch

    with torch.inference_mode():
        out = model.encode(texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False)
    if out.is_sparse:
        out = out.to_dense()
    return out.float().numpy()


def exact_dense_search(index: np.ndarray, k: int = 10):
    def search(query: np.ndarray) -> np.ndarray:
        scores = index @ query
        top = np.argpartition(-scores, k - 1)[:k]
        return top[np.argsort(-scores[top], kind="stable")]
    return search


def ndcg_at_10(ranked: list[np.ndarray], query_ids: list[str], doc_ids: list[str], qrels: dict) -> float:
    total = 0.0
    for ranking, qid in zip(ranked, query_ids):
        relevant = qrels[qid]
        gains = [relevant.get(doc_ids[d], 0) for d in ranking[:10]]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted(relevant.values(), reverse=True)[:10]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        total += dcg / idcg if idcg else 0.0
    return total / len(ranked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="whose heads (the sweep's csrv2-ft-k2 and mrl-k32)")
    parser.add_argument("--csr", type=Path, help="a CSRv2 k=2 folder (default: the sweep's, of --seed)")
    parser.add_argument("--mrl", type=Path, help="an MRL-32 folder (default: the sweep's, of --seed)")
    parser.add_argument("--encode-texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=None, help="SciFact documents to index (default: all)")
    parser.add_argument("--queries", type=int, default=None, help="SciFact test queries (default: all 300)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "csr_speed.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm import tqdm

    from seqtopk.paths import cache_dir
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.data import readers
    from seqtopk.sparse.index.inverted import InvertedIndex
    from seqtopk.sparse.index.rows import SparseRows

    heads = cache_dir("heads")
    csr = args.csr or heads / f"csrv2-ft-k2-seed{args.seed}"
    mrl = args.mrl or heads / f"mrl-k32-seed{args.seed}"
    for name, folder in (("--csr", csr), ("--mrl", mrl)):
        if not (folder / "modules.json").is_file():
            parser.error(f"{name} {folder} is not a trained head folder: run evals/csr_mteb_sweep.py first, or pass "
                         f"{name} PATH")
    models = load_models(csr, mrl)
    corpus, queries, qrels = readers.scifact_corpus(), readers.scifact_queries("test"), readers.scifact_qrels("test")
    query_ids = list(queries)[: args.queries]
    # A smaller corpus (--docs) keeps the queries' judged documents, then the others in corpus order.
    judged = {d for q in query_ids for d in qrels[q]}
    doc_ids = [d for d in corpus if d in judged] + [d for d in corpus if d not in judged]
    position = {d: i for i, d in enumerate(corpus)}
    doc_ids = sorted(doc_ids[: max(args.docs or len(doc_ids), len(judged))], key=position.__getitem__)
    docs = [readers.scifact_document_text(corpus[d]) for d in doc_ids]

    texts = docs[: args.encode_texts]
    for model in models.values():  # warm-up: first-call allocation
        encode(model, texts[:32])
    per_round = {name: [] for name in MODELS}
    for r in tqdm(range(args.rounds), desc="encode rounds"):
        for name in MODELS[r % 3:] + MODELS[: r % 3]:
            start = time.perf_counter()
            encode(models[name], texts)
            per_round[name].append(len(texts) / (time.perf_counter() - start))

    search_rows = {}
    for name in tqdm(MODELS, desc="search"):
        folder = {"dense 384-d": default_backbone(), "MRL-32": mrl, "CSRv2 k=2": csr}[name]
        doc_vectors = index_vectors(name, folder, models[name], docs)
        query_vectors = index_vectors(name, folder, models[name], [queries[q] for q in query_ids])
        if name == "CSRv2 k=2":
            index = InvertedIndex(SparseRows.from_dense(doc_vectors))
            rows = SparseRows.from_dense(query_vectors)
            queries_in = [rows.row(i) for i in range(rows.n_rows)]
            search, nbytes = (lambda q, index=index: index.search(q[0], q[1], 10)[0]), index.nbytes
            active = float(np.mean(np.diff(SparseRows.from_dense(doc_vectors).indptr)))
        else:
            search, nbytes = exact_dense_search(np.ascontiguousarray(doc_vectors)), doc_vectors.nbytes
            queries_in, active = list(query_vectors), float(doc_vectors.shape[1])
        search(queries_in[0])  # (numba compiles on the first call)
        ranked, times = [], []
        for q in queries_in:
            start = time.perf_counter()
            ranked.append(search(q))
            times.append(time.perf_counter() - start)
        search_rows[name] = {"us_median": round(1e6 * float(np.median(times)), 2),
                             "us_mean": round(1e6 * float(np.mean(times)), 2), "index_bytes": int(nbytes),
                             "active_dims_per_doc": round(active, 2),
                             "ndcg_at_10": round(100 * ndcg_at_10(ranked, query_ids, doc_ids, qrels), 2)}
    encode_rows = {name: {"texts_per_s_median": round(float(np.median(v)), 1),
                          "texts_per_s_rounds": [round(x, 1) for x in v]} for name, v in per_round.items()}
    dense = MODELS[0]
    result = {
        "description": __doc__.split("\n\n")[0], "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "heads": {"csr": str(csr), "mrl": str(mrl)},
        "docs": len(docs), "queries": len(query_ids), "encode_texts": len(texts), "rounds": args.rounds,
        "load_average": list(os.getloadavg()), "encode": encode_rows, "search": search_rows,
        "ratios": {name: {"encode_speed_vs_dense": round(encode_rows[name]["texts_per_s_median"]
                                                         / encode_rows[dense]["texts_per_s_median"], 3),
                          "search_speedup_vs_dense": round(search_rows[dense]["us_median"] / search_rows[name]["us_median"], 2),
                          "index_bytes_vs_dense": round(search_rows[name]["index_bytes"] / search_rows[dense]["index_bytes"], 4)}
                   for name in MODELS},
        "recorded": time.strftime("%Y-%m-%d %H:%M")}
    save_results(result, args.out, plot)
    for name in MODELS:
        e, s = encode_rows[name], search_rows[name]
        print(f"{name:12s} encode {e['texts_per_s_median']:7.1f} texts/s   search {s['us_median']:8.1f} us median "
              f"({s['index_bytes'] / 1e6:.2f} MB index)   nDCG@10 {s['ndcg_at_10']:.1f}")
    print(f"wrote {args.out}")
    return 0


def plot(result: dict, path: Path) -> None:
    names = list(result["encode"])
    with figure(path, 1, 3, figsize=(12, 3.4)) as (fig, axes):
        panels = ((result["encode"], "texts_per_s_median", "encode: texts / s (median)"),
                  (result["search"], "us_median", "search: µs per query (median)"),
                  (result["search"], "index_bytes", "index bytes"))
        for ax, (rows, key, title) in zip(axes, panels):
            values = [rows[n][key] for n in names]
            ax.bar(names, values, color=["tab:grey", "tab:blue", "tab:green"])
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:,.1f}" if v < 1e4 else f"{v / 1e6:.2f} MB", ha="center", va="bottom", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle(f"SciFact ({result['docs']:,} documents, {result['queries']} queries), {result['threads']} threads: "
                     "CSRv2 k=2 against dense and MRL-32", fontsize=9)


if __name__ == "__main__":
    raise SystemExit(main())
