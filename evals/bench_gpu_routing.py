"""GPU routing cost: SeqTopK's selection next to torch.topk, eager and in a captured CUDA graph.

Measures, side by side in one run (CUDA events, median of --repeats):
- prefill: one layer's selection on router logits [tokens x experts] (default 16384 x 64, top-8, cap 10, one
  sequence): stock = softmax + torch.topk(k) + renormalise; seqtopk = softmax + top-cap + the sequence cut
  (the fused Triton cut on CUDA, seqtopk/kernels/sequence_cut.py) + weights; "seqtopk torch" = the same with the
  pure-torch cut (the reference). Ratios to stock.
- decode: one layer's step for --rows sequences at --context tokens of paged history: stock TopK; seqtopk's
  fused Triton step (seqtopk/kernels/decode_step.py), eager and replayed from a CUDA graph; the torch path.
Writes evals/results/gpu_routing_<device>.json and a PNG next to it. On a machine without CUDA it runs the
torch paths only (for checking the script: `--device cpu --tokens 512 --rows 8 --context 64`).

    python evals/bench_gpu_routing.py [--device cuda] [--tokens 16384] [--experts 64] [--rows 256] [--context 1024]
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

RESULTS = Path(__file__).resolve().parent / "results"


def timer(device: str, repeats: int):
    """Median milliseconds of fn() over `repeats` calls after warm-up (CUDA events on a GPU)."""

    def measure(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)

    return measure


def prefill_paths(tokens: int, experts: int, k: int, cap: int, device: str) -> dict:
    from seqtopk.kernels import sequence_cut
    from seqtopk.kernels.backend import TRITON_STEPS
    from seqtopk.routing.rules import select_sequence
    from seqtopk.routing.scoring import SoftmaxScoring

    logits = torch.randn(tokens, experts, device=device).to(torch.bfloat16)
    scoring = SoftmaxScoring(renormalize=True)

    def stock():
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def seqtopk(fused: bool):
        def run():
            cand = scoring.candidates(logits, cap)
            mask = select_sequence(cand.values.unsqueeze(0), None, k, fused=TRITON_STEPS if fused else None)[0]
            return scoring.weights(logits, cand, mask), cand.ids
        return run

    paths = {"stock topk": stock, "seqtopk torch": seqtopk(False)}
    if sequence_cut.available(torch.device(device)):
        paths["seqtopk fused"] = seqtopk(True)
    return paths


def decode_paths(rows: int, context: int, experts: int, k: int, cap: int, device: str) -> dict:
    from seqtopk.config import SeqTopKConfig
    from seqtopk.kernels import decode_step
    from seqtopk.routing.paged import PagedLayout
    from seqtopk.routing.ragged import ragged_batch
    from seqtopk.kernels.paths import route
    from seqtopk.routing.rules import TokenRules
    from seqtopk.routing.scoring import SoftmaxScoring

    block = 16
    cfg = SeqTopKConfig(k=k, cap=cap).resolve(k, experts)
    logits = torch.randn(rows, experts, device=device).to(torch.bfloat16)
    per_row = context // block + 2
    store = torch.rand(rows * per_row * block + 1, experts, device=device).softmax(-1).topk(cap).values
    table = torch.arange(rows * per_row, dtype=torch.int32, device=device).view(rows, per_row)
    batch = ragged_batch(torch.arange(rows + 1, device=device), torch.full((rows,), context + 1, device=device),
                         rows, 1)
    slots = table[:, context // block].long() * block + context % block
    layout = PagedLayout(table, block, batch.context, context, store.shape[0], write_slots=slots)
    rules = TokenRules.per_token(cfg, torch.zeros(rows, dtype=torch.bool, device=device),
                                 torch.ones(rows, dtype=torch.bool, device=device), 1)
    scoring = SoftmaxScoring(renormalize=True)

    def stock():
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def seqtopk():
        return route(logits, scoring, cfg, batch, rules, layout.of(store), unchosen="repeat_best")

    paths = {"stock topk": stock}
    if decode_step.available(torch.device(device)):
        paths["seqtopk fused"] = seqtopk
        paths["seqtopk fused, CUDA graph"] = captured(seqtopk)
        paths["stock topk, CUDA graph"] = captured(stock)
    else:
        from seqtopk.kernels import backend

        def reference():
            with backend.forced(backend.TORCH):
                return seqtopk()

        paths["seqtopk torch"] = reference
    return paths


def captured(fn):
    """fn captured once in a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384, help="prefill tokens (one sequence)")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--cap", type=int, default=10)
    parser.add_argument("--rows", type=int, default=256, help="decode: sequences in the step")
    parser.add_argument("--context", type=int, default=1024, help="decode: history tokens per sequence")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default evals/results/gpu_routing_<device>.json)")
    args = parser.parse_args(argv)
    measure = timer(args.device, args.repeats)
    with torch.no_grad():
        groups = {"prefill": prefill_paths(args.tokens, args.experts, args.k, args.cap, args.device),
                  "decode": decode_paths(args.rows, args.context, args.experts, args.k, args.cap, args.device)}
        result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                  "torch": torch.__version__, "shape": vars(args) | {"out": None}, "ms": {}, "ratio_to_stock": {}}
        jobs = [(g, name, fn) for g, paths in groups.items() for name, fn in paths.items()]
        for group, name, fn in tqdm(jobs, desc="routing paths"):
            result["ms"].setdefault(group, {})[name] = measure(fn)
    for group, times in result["ms"].items():
        stock = times["stock topk"]
        result["ratio_to_stock"][group] = {name: ms / stock for name, ms in times.items()}
    out = args.out or RESULTS / f"gpu_routing_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    draw(result, out.with_suffix(".png"))
    for group, ratios in result["ratio_to_stock"].items():
        for name, ratio in ratios.items():
            print(f"{group:8s} {name:28s} {result['ms'][group][name]:9.4f} ms  {ratio:6.2f}x stock")
    return result


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["ms"]), figsize=(5 * len(result["ms"]), 3.5))
    for ax, (group, times) in zip(axes, result["ms"].items()):
        ax.barh(list(times), list(times.values()))
        ax.set_title(f"{group} ({result['device']})")
        ax.set_xlabel("ms per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
