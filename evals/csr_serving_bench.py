"""Encoding throughput of a served CSR head vs the dense backbone alone, both under vLLM, same run.

Starts two vLLM servers (the dense all-MiniLM-L6-v2 folder and the head folder, same dtype), then times
/v1/embeddings over the same texts in alternating rounds, so that both see the same machine load; the
head's sparse route (/pooling with the seqtopk_csr_sparse plugin) is timed too. The recorded ratio is the
median over rounds of the head/dense ratio within a round. Also checks in the same
run that the served head's embeddings equal SparseEncoder's. Writes evals/results/csr_serving.{json,png}.

    .venv/bin/python evals/csr_serving_bench.py --head ~/.cache/seqtopk/heads/csr-k32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def bench_texts(n: int) -> list[str]:
    """Short and long real texts: STS-B test sentences and SciFact test queries, then SciFact documents."""
    from seqtopk.sparse.data import readers

    sentences = [t for a, b, _ in readers.stsb_pairs("test") for t in (a, b)] + list(readers.scifact_queries("test").values())
    docs = [readers.scifact_document_text(d) for d in list(readers.scifact_corpus().values())[: n // 8]]
    return sentences[: n - len(docs)] + docs


def run_round(server, path: str, batches: list[list[str]], body, concurrency: int) -> float:
    """Texts per second for sending every batch (`concurrency` requests in flight)."""

    def send(batch):
        status, reply = server.post(path, body(batch))
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {reply}")

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, batches))
    return sum(map(len, batches)) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, required=True)
    parser.add_argument("--backbone", type=Path, default=None, help="dense model folder (default: offline all-MiniLM-L6-v2)")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS / "csr_serving")
    args = parser.parse_args()

    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.testing.server import VLLMServer

    backbone = args.backbone or default_backbone()
    texts = bench_texts(args.texts)
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    embed_body = lambda batch: {"input": batch, "truncate_prompt_tokens": -1}  # noqa: E731
    sparse_body = lambda batch: {"data": {"input": batch}, "truncate_prompt_tokens": -1}  # noqa: E731
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    flags = ("--dtype", args.dtype, "--max-num-seqs", str(args.batch * args.concurrency))

    print("starting the dense and the head server ...", flush=True)
    with VLLMServer.pooling(backbone, *flags, log=logs / "csr_bench_dense.log") as dense, VLLMServer.pooling(args.head, *flags, log=logs / "csr_bench_head.log") as head:
        runs = {"dense /v1/embeddings": (dense, "/v1/embeddings", embed_body), "head /v1/embeddings": (head, "/v1/embeddings", embed_body),
                "head /pooling sparse": (head, "/pooling", sparse_body)}
        for server, path, body in runs.values():  # warm-up
            run_round(server, path, batches[:2], body, args.concurrency)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                rates[name].append(run_round(*runs[name][:2], batches, runs[name][2], args.concurrency))
            print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f}/s" for n in runs), flush=True)
        equality = check_equal_to_sparse_encoder(head, args.head, texts[:64])

    median = {name: float(np.median(values)) for name, values in rates.items()}
    # Ratios within a round (same minute, same machine load), then the median over rounds.
    paired = lambda name: [h / d for h, d in zip(rates[name], rates["dense /v1/embeddings"])]  # noqa: E731
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "head": str(args.head),
        "backbone": str(backbone),
        "dtype": args.dtype,
        "texts": len(texts),
        "batch": args.batch,
        "concurrency": args.concurrency,
        "texts_per_second": rates,
        "median_texts_per_second": median,
        "ratio_head_over_dense": float(np.median(paired("head /v1/embeddings"))),
        "ratio_head_sparse_route_over_dense": float(np.median(paired("head /pooling sparse"))),
        "ratio_per_round": {name: paired(name) for name in ("head /v1/embeddings", "head /pooling sparse")},
        "served_vs_sparse_encoder": equality,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


def check_equal_to_sparse_encoder(server, head_dir: Path, texts: list[str]) -> dict:
    from sentence_transformers import SparseEncoder

    status, reply = server.post("/v1/embeddings", {"input": texts, "truncate_prompt_tokens": -1})
    assert status == 200, reply
    served = np.array([item["embedding"] for item in reply["data"]], dtype=np.float32)
    reference = SparseEncoder(str(head_dir), device="cpu", local_files_only=True).encode(texts, convert_to_tensor=True).to_dense().numpy()
    return {
        "texts": len(texts),
        "max_abs_diff": float(np.abs(served - reference).max()),
        "same_active_latents": bool(((served > 0) == (reference > 0)).all()),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["texts_per_second"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        values = result["texts_per_second"][name]
        ax.scatter([i] * len(values), values, color="#999999", s=12)
        ax.bar(i, result["median_texts_per_second"][name], alpha=0.6)
    ax.set_xticks(range(len(names)), [n.replace(" /", "\n/") for n in names])
    ax.set_ylabel("texts / second (median, rounds as dots)")
    ax.set_title(f"vLLM encoding throughput ({result['dtype']}); median per-round head/dense = {result['ratio_head_over_dense']:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
