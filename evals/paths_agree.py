"""Every routing path makes the same choice: the differential checker (seqtopk.testing.paths_agree) at length.

Draws configurations with hypothesis and runs each on every path this machine offers (the torch reference, the
compiled CPU kernels, and Triton under its interpreter in a child process), comparing chosen slots, expert ids,
scores, statistics and outputs with the torch reference; then drawn settings in vLLM engines, whose worker traces
(continuous batching, chunked prefill, preemption) are checked by the rule. Every patched family with a tiny checkpoint is drawn at
model level. Findings are recorded, not raised, so a run reports all of them; the script exits 1 when there is
one. Writes evals/results/paths_agree.json (+ .png): configurations run per level and family, refused settings,
findings, the decode bands the compiled kernel built and answered from, and the versions of every path.

    .venv/bin/python evals/paths_agree.py                     # 10,000 configurations (about an hour on 2 cores)
    .venv/bin/python evals/paths_agree.py --model 40 --routing 60 --triton 5 --vllm 1 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULT = ROOT / "evals" / "results" / "paths_agree.json"


def run_level(level: str, count: int, seed: int, families: list[str] | None) -> dict:
    """Draw `count` configurations of one level ("model", "routing", or "triton": routing cases with Triton in the
    paths) and check each; returns the tallies."""
    import torch
    from hypothesis import HealthCheck, given, settings, strategies as st
    from tqdm import tqdm

    from seqtopk.testing import paths_agree

    if level == "vllm":
        return run_served(count, seed)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    paths = paths_agree.available_paths()
    pool = paths_agree.ModelPool()
    model_cases, routing_cases = paths_agree.strategies(families, pool)
    tally = dict(level=level, paths=paths, checked=0, refused=0, findings=[], families=Counter(),
                 bands=[0, 0, 0], settings=Counter(), refusals=Counter())
    progress = tqdm(total=count, desc=f"{level} cases", file=sys.stderr)

    @settings(max_examples=count, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        if level == "model":
            case = data.draw(model_cases)
            run = lambda: paths_agree.check_model_case(pool.get(case.family), case, paths)  # noqa: E731
        else:
            strategy = routing_cases.filter(lambda c: c.decode_steps <= 24) if level == "triton" else routing_cases
            case = data.draw(strategy)
            run = lambda: paths_agree.check_routing_case(case, paths, tally["bands"])  # noqa: E731
        progress.update(1)
        try:
            found = run()
        except paths_agree.Refused as reason:
            tally["refused"] += 1
            tally["refusals"][str(reason)[:160]] += 1
            return
        tally["checked"] += 1
        if level == "model":
            tally["families"][case.family] += 1
        else:
            tally["settings"][f"scoring={case.scoring}"] += 1
        tally["settings"][f"k={'whole' if isinstance(case.settings['k'], int) else 'fractional'}"] += 1
        tally["settings"][f"prefill={case.settings['prefill']}"] += 1
        tally["settings"][f"decode={case.settings['decode']}"] += 1
        if found is not None:
            tally["findings"].append(found[:4000])

    from hypothesis import seed as fixed_seed

    fixed_seed(seed)(check)()
    progress.close()
    tally["families"], tally["settings"] = dict(tally["families"]), dict(tally["settings"])
    tally["refusals"] = dict(tally["refusals"])  # why: settings the layer refuses, or inputs the model itself cannot run
    tally["band_counters"] = dict(zip(("band_builds", "band_answers", "history_walks"), tally.pop("bands")))
    return tally


def run_served(count: int, seed: int, cases_per_engine: int = 8) -> dict:
    """`count` drawn settings, one vLLM engine each (tiny qwen3_moe; chunked prefill of 32-token chunks where the
    settings allow it; a KV cache small enough to preempt), each checked on `cases_per_engine` drawn batches."""
    import random

    from hypothesis import HealthCheck, given, settings, strategies as st
    from tqdm import tqdm
    from vllm import LLM

    from seqtopk.config import SeqTopKConfig
    from seqtopk.testing import paths_agree
    from seqtopk.testing.tiny import cached_checkpoint

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = cached_checkpoint("qwen3_moe")
    engine_settings, served_cases = paths_agree.served_strategies(vocab=300, max_len=160)
    tally = dict(level="vllm", paths=["vllm-worker"], checked=0, refused=0, findings=[], engines=[], tokens=0,
                 routings=0, settings={})
    drawn = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def draw_settings(data):
        drawn.append(data.draw(engine_settings(2, 8)))

    from hypothesis import seed as fixed_seed

    fixed_seed(seed)(draw_settings)()
    for options in tqdm(drawn[:count], desc="vLLM engines", file=sys.stderr):
        cfg = SeqTopKConfig(**options).resolve(2, 8)
        # 32-token prefill chunks where the rule allows chunking (the sequence rule switches it off)
        chunking = dict(max_num_batched_tokens=32, enable_chunked_prefill=True) if options["prefill"] == "causal" else {}
        llm = LLM(str(path), dtype="float32", max_model_len=352, max_num_seqs=32, seed=0, block_size=32,
                  num_gpu_blocks_override=12, enable_prefix_caching=False, additional_config={"seqtopk": options},
                  **chunking)
        counts: dict = {}
        try:
            @settings(max_examples=cases_per_engine, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=served_cases)
            def check(case):
                found = paths_agree.check_served_case(llm, case, cfg, counts)
                tally["checked"] += 1
                if found is not None:
                    tally["findings"].append(f"settings {options}: {found}"[:4000])

            fixed_seed(random.Random(seed).randrange(2**16))(check)()
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
        tally["engines"].append(dict(settings=options, **counts))
        tally["tokens"] += counts.get("tokens", 0)
        tally["routings"] += counts.get("routings", 0)
    tally["engine_count"] = len(tally["engines"])
    return tally


def versions() -> dict:
    import torch
    import transformers

    from seqtopk.kernels import compiled, decode_step

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"seqtopk_commit": commit or None, "torch": torch.__version__, "transformers": transformers.__version__,
            "compiled_kernels": compiled.status(),
            "triton": getattr(decode_step.triton, "__version__", None) if decode_step.triton else None}


def plot(result: dict, path: Path) -> None:
    from _results import figure

    levels = result["levels"]
    with figure(path, 1, 2, figsize=(12, 4.5)) as (fig, (left, right)):
        names = list(levels)
        left.bar(names, [levels[n]["checked"] for n in names], label="checked")
        left.bar(names, [levels[n]["refused"] for n in names], bottom=[levels[n]["checked"] for n in names],
                 label="refused settings")
        for i, n in enumerate(names):
            left.text(i, levels[n]["checked"] + levels[n]["refused"], f"{len(levels[n]['findings'])} findings",
                      ha="center", va="bottom")
        left.set_yscale("log")  # (a few dozen vLLM batches beside thousands of routing cases)
        left.set_ylim(1, max(levels[n]["checked"] + levels[n]["refused"] for n in names) * 4)
        left.set_title("configurations per level (vllm: request batches)")
        left.legend(loc="upper right")
        families = levels.get("model", {}).get("families", {})
        right.barh(list(families), list(families.values()))
        right.set_title("model-level configurations per family")
        right.tick_params(axis="y", labelsize=6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=int, default=2500, help="model-level configurations (default 2500)")
    parser.add_argument("--routing", type=int, default=7400, help="routing-level configurations (default 7400)")
    parser.add_argument("--triton", type=int, default=100,
                        help="routing-level configurations with the Triton path, in its interpreter (default 100)")
    parser.add_argument("--vllm", type=int, default=6,
                        help="drawn settings checked in a vLLM engine each, 8 batches of requests per engine (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="*", default=None, help="model-level families (default: every one)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--extend", action="store_true",
                        help="keep the levels of an existing --out file that this run does not run (count 0)")
    parser.add_argument("--level", choices=["model", "routing", "triton", "vllm"], help=argparse.SUPPRESS)  # children
    args = parser.parse_args(argv)
    if args.level:  # a child: one level, its tally as JSON on stdout's last line
        count = getattr(args, args.level)
        print(json.dumps(run_level(args.level, count, args.seed, args.families)))
        return 0
    start = time.time()
    load = os.getloadavg()
    tested = versions()  # at the start: the code the children import
    levels, runs = {}, {}
    if args.extend and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        levels.update(earlier["levels"])
        runs.update(earlier.get("runs", {level: earlier["versions"] for level in earlier["levels"]}))
    for level in ("model", "routing", "triton", "vllm"):
        count = getattr(args, level)
        if not count:
            continue
        env = {**os.environ, **({"TRITON_INTERPRET": "1"} if level == "triton" else {})}
        command = [sys.executable, __file__, "--level", level, f"--{level}", str(count), "--seed", str(args.seed)]
        if args.families:
            command += ["--families", *args.families]
        child = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            print(f"the {level} run failed (exit {child.returncode})", file=sys.stderr)
            return 2
        levels[level] = json.loads(child.stdout.strip().splitlines()[-1])
        runs[level] = {**tested, "load_average_at_start": [round(x, 2) for x in load]}
    findings = sum(len(level["findings"]) for level in levels.values())
    result = {
        "configurations": sum(level["checked"] + level["refused"] for level in levels.values()),
        "checked": sum(level["checked"] for level in levels.values()),
        "findings": findings,
        "paths": sorted({p for level in levels.values() for p in level["paths"]}),
        "levels": levels,
        "versions": tested,
        "runs": runs,  # per level: the code and load it ran under (levels kept by --extend keep theirs)
        "seconds": round(time.time() - start),
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    from _results import save_results

    save_results(result, args.out, plot)
    print(f"{result['configurations']} configurations ({result['checked']} run, the rest refused up front), "
          f"{findings} findings, paths {result['paths']}; wrote {args.out}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
