"""Cost of one SeqTopK decode step per MoE layer as the context grows, next to stock TopK's routing.

The streaming rule compares each new token's candidates with every earlier capped score of its sequence (exact:
no approximation). Measured per layer and decode step, over consecutive steps of decoding (each step routes one
new token per sequence, writes its scores, and the next step's context is one longer, as in serving):
- "topk": stock routing (softmax, top-k, renormalise), the floor;
- "compiled": the compiled CPU op as engines run it, with the per-sequence bands (seqtopk/kernels/cpu/history.h):
  a band answers the cut in O(log) and is rebuilt from the paged history only when the cut leaves it, so its
  cost is amortised over the steps measured (and counted: builds per step are recorded);
- "compiled-walk": the same op without bands, walking the whole history each step (what the op falls back to);
- "torch": the torch reference (gathers the history; up to --torch-max context).
Each timed step uses fresh router logits. Before timing, every path's choices are checked against the torch
reference on the same steps (slot for slot). Same layer shape as evals/bench_vllm.py (64 experts, top-8, cap 10),
32 sequences, paged history in 16-slot blocks. Writes evals/results/decode_routing_cpu.json and a PNG next to it.

    python evals/bench_decode_routing.py [--contexts 128 512 2048 8192 32768] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name  # noqa: E402  (evals/ is scripts, not a package)

EXPERTS, K, BLOCK = 64, 8, 16


class Decoding:
    """`rows` sequences at `context` tokens of history each, decoding one token per step on a paged store."""

    def __init__(self, context: int, rows: int, steps: int, seed: int = 0):
        from seqtopk.config import SeqTopKConfig
        from seqtopk.kernels.paths import new_bands

        self.cfg = SeqTopKConfig(k=K).resolve(K, EXPERTS)
        self.rows, self.context = rows, context
        gen = torch.Generator().manual_seed(seed)
        per_row = (context + steps) // BLOCK + 2
        self.table = torch.randperm(rows * per_row, generator=gen).view(rows, per_row).int()
        slots = rows * per_row * BLOCK + 1
        self.store = torch.full((slots, self.cfg.cap), float("-inf"))
        history = torch.topk(torch.softmax(torch.randn(rows * context, EXPERTS, generator=gen) * 2, -1), self.cfg.cap).values
        position = torch.arange(context)
        for r in range(rows):
            where = self.table[r, position // BLOCK].long() * BLOCK + position % BLOCK
            self.store[where] = history[r * context:(r + 1) * context]
        self.logits = torch.randn(steps, rows, EXPERTS, generator=gen).mul(2).to(torch.bfloat16)
        self.bands = new_bands(rows)
        self.step_index = 0
        # An engine reads each step's layout once for all its MoE layers: built here, outside the timed layer step
        # (its own cost per step is measured apart, `layout_us_per_step`).
        self.layouts = [self.layout_at(i) for i in range(steps)]
        for batch, layout in self.layouts:  # and converted for the compiled op, once per step too
            batch.kernel_rows(batch.context.device)
            layout.kernel_args()

    def layout(self):
        from seqtopk.routing.paged import PagedLayout
        from seqtopk.routing.ragged import ragged_batch

        context = self.context + self.step_index
        batch = ragged_batch(torch.arange(self.rows + 1), torch.full((self.rows,), context + 1), self.rows, 1)
        slots = self.table[:, context // BLOCK].long() * BLOCK + context % BLOCK
        return batch, PagedLayout(self.table, BLOCK, batch.context, context, self.store.shape[0], write_slots=slots,
                                  row_band=torch.arange(self.rows))

    def step(self, path: str):
        """Route one decode step on `path` and advance."""
        from seqtopk.kernels import backend
        from seqtopk.kernels.paths import route
        from seqtopk.routing.rules import TokenRules
        from seqtopk.routing.scoring import SoftmaxScoring

        logits = self.logits[self.step_index]
        self.step_index += 1
        if path == "topk":
            probs = torch.softmax(logits.float(), dim=-1)
            weights, ids = torch.topk(probs, K, dim=-1)
            return weights / weights.sum(dim=-1, keepdim=True), ids.to(torch.int32)
        batch, layout = self.layouts[self.step_index - 1]
        rules = TokenRules.uniform("causal")
        scoring = SoftmaxScoring(renormalize=True)
        if path == "compiled":
            return route(logits, scoring, self.cfg, batch, rules, layout.of(self.store, self.bands), unchosen="repeat_best")
        if path == "compiled-walk":
            return route(logits, scoring, self.cfg, batch, rules, layout.of(self.store), unchosen="repeat_best")
        with backend.forced(backend.TORCH):
            return route(logits, scoring, self.cfg, batch, rules, layout.of(self.store), unchosen="repeat_best")

    def layout_at(self, index: int):
        saved, self.step_index = self.step_index, index
        try:
            return self.layout()
        finally:
            self.step_index = saved


def check_equal(context: int, rows: int, steps: int, paths: list[str]) -> None:
    """Every path's choices equal the torch reference's on the same consecutive steps."""
    runs = {path: Decoding(context, rows, steps) for path in paths + ["torch"]}
    for _ in range(steps):
        reference = runs["torch"].step("torch").mask
        for path in paths:
            got = runs[path].step(path).mask
            if not torch.equal(got, reference):
                raise AssertionError(f"{path} differs from the torch rule at context {context}")


def time_steps(context: int, rows: int, warm: int, steps: int, path: str) -> tuple[float, list[float]]:
    """Median and mean µs per step over `steps` consecutive steps after `warm` untimed ones, band builds per timed
    step, and the µs of the first step (which builds the bands)."""
    run = Decoding(context, rows, warm + steps)
    start = time.perf_counter()
    run.step(path)  # the first step: every row's band is built from the store (the compiled path)
    first = (time.perf_counter() - start) * 1e6
    for _ in range(warm - 1):
        run.step(path)
    from seqtopk.kernels import ops

    counters = ops.band_counters if path.startswith("compiled") else None
    if counters:
        counters()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        run.step(path)
        samples.append(time.perf_counter() - start)
    builds = counters()[0] / steps if counters else None
    return statistics.median(samples) * 1e6, statistics.mean(samples) * 1e6, builds, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192, 32768])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="timed consecutive steps per context and path")
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--check-steps", type=int, default=40, help="steps compared with the torch rule first")
    parser.add_argument("--torch-max", type=int, default=4096, help="largest context the torch path is timed at")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_routing_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from seqtopk.kernels import compiled

    if not compiled.load():
        raise SystemExit(f"{compiled.status()}; this benchmark measures the compiled op")
    load_before = os.getloadavg()
    paths = ["topk", "compiled", "compiled-walk", "torch"]
    median_us = {path: {} for path in paths}
    mean_us = {path: {} for path in paths}
    builds, first_us = {}, {}
    layout_us = {}
    for context in tqdm(args.contexts, desc="contexts"):
        probe = Decoding(context, args.rows, 50)
        start = time.perf_counter()
        for i in range(50):
            batch, layout = probe.layout_at(i)
            batch.kernel_rows(batch.context.device)
            layout.kernel_args()
        layout_us[context] = (time.perf_counter() - start) / 50 * 1e6
        check_equal(context, args.rows, args.check_steps, ["compiled", "compiled-walk"])
        for path in paths:
            if path == "torch" and context > args.torch_max:
                continue
            median_us[path][context], mean_us[path][context], built, first = time_steps(
                context, args.rows, args.warm, args.steps, path)
            if path == "compiled":
                builds[context], first_us[context] = built, first
    result = {
        "device": "cpu", "cpu": cpu_name(), "threads": args.threads,
        "torch": torch.__version__, "rows": args.rows, "experts": EXPERTS, "k": K, "cap": K + 2,
        "block_size": BLOCK, "timed_steps": args.steps, "checked_steps": args.check_steps,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "us_per_layer_step": median_us, "mean_us_per_layer_step": mean_us,
        "band_builds_per_step": builds,
        "compiled_first_step_us": first_us,
        "first_step_note": "a sequence's first decode step after its prompt builds its band from the store, O(context), "
                           "once; later steps rebuild only when the cut leaves the band (band_builds_per_step)",
        "layout_us_per_step": layout_us,
        "layout_note": "the step layout (rows, contexts, slots) is built once per step and shared by every MoE layer; "
                       "it is not in the per-layer figures",
        "ratio_vs_topk": {p: {c: median_us[p][c] / median_us["topk"][c] for c in median_us[p]}
                          for p in paths if p != "topk"},
        "mean_ratio_vs_topk": {p: {c: mean_us[p][c] / mean_us["topk"][c] for c in mean_us[p]}
                               for p in paths if p != "topk"},
        "target": "compiled <= 2x topk at every context, flat in context",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"us_per_layer_step": median_us, "band_builds_per_step": builds,
                      "ratio_vs_topk": result["ratio_vs_topk"]}, indent=2))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, series in result["us_per_layer_step"].items():
        contexts = sorted(int(c) for c in series)
        ax.plot(contexts, [series[c] if c in series else series[str(c)] for c in contexts], marker="o", label=name)
    topk = result["us_per_layer_step"]["topk"]
    contexts = sorted(int(c) for c in topk)
    ax.plot(contexts, [2 * (topk[c] if c in topk else topk[str(c)]) for c in contexts], ls="--", color="grey",
            label="target: 2x topk")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("µs per MoE layer per decode step (median)")
    ax.set_title(f"decode routing, {result['rows']} sequences, {result['experts']} experts, k={result['k']}, "
                 f"cap={result['cap']}, {result['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
