"""Cost of one SeqTopK decode step per MoE layer as the context grows, next to stock TopK's routing.

The streaming rule compares each new token's candidates with every earlier capped score of its sequence
(exact: no approximation), so its cost grows with the context; this measures by how much, for the three
ways a vLLM decode step can run it:
- "torch": the pure-torch path (gather the paged history, broadcast compare, ~25 small ops);
- "compiled": the compiled CPU kernel (`seqtopk kernels --build`): candidates, cut, weights and the history
  write in one call that walks the paged history in place;
- "topk": stock routing (softmax, top-k, renormalise), the floor.
Same layer shape as evals/bench_vllm.py (64 experts, top-8, cap 10), 32 sequences, paged history with
16-slot blocks. Writes evals/results/decode_routing_cpu.json and a PNG next to it.

    python evals/bench_decode_routing.py [--contexts 128 512 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm


def layer_step(context: int, rows: int, experts: int, k: int, block: int, path: str):
    """A callable that routes one decode step of one layer, as the vLLM adapter does."""
    from seqtopk.config import SeqTopKConfig
    from seqtopk.kernels import compiled
    from seqtopk.routing.paged import PagedLayout
    from seqtopk.routing.ragged import ragged_batch
    from seqtopk.routing.router import route
    from seqtopk.routing.rules import TokenRules
    from seqtopk.routing.scoring import SoftmaxScoring

    cfg = SeqTopKConfig(k=k).resolve(k, experts)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, experts, generator=gen).to(torch.bfloat16)
    if path == "topk":
        def stock():
            probs = torch.softmax(logits.float(), dim=-1)
            weights, ids = torch.topk(probs, k, dim=-1)
            return weights / weights.sum(dim=-1, keepdim=True), ids.to(torch.int32)
        return stock
    per_row = context // block + 2
    store = torch.topk(torch.rand(rows * per_row * block + 1, experts, generator=gen).softmax(-1), cfg.cap).values
    table = torch.arange(rows * per_row, dtype=torch.int32).view(rows, per_row)
    batch = ragged_batch(torch.arange(rows + 1), torch.full((rows,), context + 1), rows, 1)
    slots = table[:, context // block].long() * block + context % block
    layout = PagedLayout(table, block, batch.context, context, store.shape[0], write_slots=slots)
    rules = TokenRules.per_token(cfg, torch.zeros(rows, dtype=torch.bool), torch.ones(rows, dtype=torch.bool), 1)
    scoring = SoftmaxScoring(renormalize=True)
    use_kernel = path == "compiled"

    def step():
        return route(logits, scoring, cfg, batch, rules, layout.of(store), unchosen="repeat_best")

    if use_kernel:
        return step

    def torch_step():
        with compiled.switched_off():
            return step()
    return torch_step


def time_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_routing_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from seqtopk.kernels import compiled

    paths = ["topk", "torch"] + (["compiled"] if compiled.load() else [])
    if "compiled" not in paths:
        print(compiled.status())
    us = {path: {} for path in paths}
    for context in tqdm(args.contexts, desc="contexts"):
        for path in paths:
            us[path][context] = time_us(layer_step(context, args.rows, 64, 8, 16, path), args.reps)
    result = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "rows": args.rows, "experts": 64, "k": 8, "cap": 10, "block_size": 16,
              "us_per_layer_step": us,
              "ratio_vs_topk": {p: {c: us[p][c] / us["topk"][c] for c in args.contexts} for p in paths if p != "topk"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["us_per_layer_step"], indent=2))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in result["us_per_layer_step"].items():
        contexts = sorted(int(c) for c in series)
        ax.plot(contexts, [series[c] if c in series else series[str(c)] for c in contexts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("µs per MoE layer per decode step")
    ax.set_title(f"decode routing, {result['rows']} sequences, {result['experts']} experts, k={result['k']}, "
                 f"cap={result['cap']}, {result['threads']} threads", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
