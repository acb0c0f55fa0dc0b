"""Verify SeqTopK under vLLM's tensor and pipeline parallelism for every family the plugin serves.

For each family (tests.vllm.test_families.FAMILIES) and layout (TP=2, PP=2), one vLLM engine on the family's
tiny offline checkpoint (SeqTopK k=2 cap=4, prefill="causal", chunks of at most 32 tokens) generates 6 greedy
tokens from a 70-token prompt. Checks, per run: every rank routed; TP ranks chose bit-identical experts (PP
stages: each layer routed by one stage); choices and greedy tokens equal the transformers path (which
the 1-rank engine equals, tests/vllm/test_families.py, so 2 ranks equal 1); each rank held routing state while
the request ran and none after; a dummy batch (what an idle data-parallel rank runs) moved no state. Records
pass/fail with the figures (differing choices, state rows, seconds, the error of a run that failed) in
JSON, rewritten after every run, and a PNG grid next to it. The ranks' threads are bound one core each
(VLLM_CPU_OMP_THREADS_BIND=0|1) unless set.

    python evals/verify_vllm_parallel.py [--families qwen3_moe ...] [--layouts tp2 pp2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.vllm.test_families: the family list

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}  # name -> (tensor parallel, pipeline parallel)
PROMPT = list(range(5, 75))
SETTINGS = {"k": 2, "cap": 4, "prefill": "causal"}
MAX_TOKENS = 6


def engine_options(family: str, pipeline_parallel: int) -> dict:
    # Eager is the faster start, but vLLM-cpu's eager MLA path disagrees with transformers even with stock
    # routing (DeepSeek-V3), and its eager pipeline stages fail (SeqTopK refuses PP with --enforce-eager).
    eager = family != "deepseek_v3" and pipeline_parallel == 1
    return dict(enforce_eager=eager, max_num_batched_tokens=32, enable_prefix_caching=False)


def verify(family: str, layout: str, root: Path) -> dict:
    from seqtopk.testing.tiny import cached_checkpoint
    from seqtopk.testing.vllm_parallel import compare, run_request, transformers_choices

    tensor_parallel, pipeline_parallel = LAYOUTS[layout]
    path = cached_checkpoint(family, root)
    start = time.perf_counter()
    try:
        run = run_request(path, SETTINGS, PROMPT, MAX_TOKENS, tensor_parallel=tensor_parallel,
                          pipeline_parallel=pipeline_parallel, **engine_options(family, pipeline_parallel))
    except Exception as err:  # the record says why a layout does not run
        return dict(passed=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:],
                    seconds=round(time.perf_counter() - start, 1))
    seconds = time.perf_counter() - start
    expected, next_tokens = transformers_choices(path, PROMPT + run.tokens[:-1], SETTINGS)
    result = compare(run, expected, next_tokens, len(PROMPT), tensor_parallel=tensor_parallel,
                     pipeline_parallel=pipeline_parallel)
    return dict(passed=all(result["checks"].values()), seconds=round(seconds, 1), **result)


def draw(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families, layouts = report["setup"]["families"], report["setup"]["layouts"]
    fig, ax = plt.subplots(figsize=(1.9 * len(layouts) + 2.5, 0.55 * len(families) + 1.4))
    for y, family in enumerate(families):
        for x, layout in enumerate(layouts):
            run = report["runs"].get(f"{family} {layout}")
            if run is None:
                color, text = "lightgrey", "not run"
            elif run["passed"]:
                color, text = "tab:green", f"pass, {run['seconds']:.0f} s"
            elif "error" in run:
                color, text = "tab:red", "did not run"
            else:
                failed = [name for name, ok in run["checks"].items() if not ok]
                color, text = "tab:orange", f"{len(failed)} check(s) failed"
            ax.add_patch(plt.Rectangle((x, y), 0.96, 0.9, color=color, alpha=0.6))
            ax.text(x + 0.48, y + 0.45, text, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(layouts))
    ax.set_ylim(len(families), 0)
    ax.set_xticks([x + 0.48 for x in range(len(layouts))], layouts)
    ax.set_yticks([y + 0.45 for y in range(len(families))], families)
    ax.set_title("SeqTopK under vLLM parallelism (CPU): 2 ranks vs the transformers path", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def save(report: dict, out: Path) -> None:
    from seqtopk.sparse.index.atomic import write_file_atomically

    write_file_atomically(out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    draw(report, out.with_suffix(".png"))


def main(argv=None) -> int:
    from tests.vllm.test_families import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY",
                        help=f"default: every vLLM-verified family ({' '.join(FAMILIES)})")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                        help="tp2: --tensor-parallel-size 2; pp2: --pipeline-parallel-size 2 (default: both)")
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm_parallel.json",
                        help="JSON, rewritten after every engine; the PNG goes next to it")
    args = parser.parse_args(argv)

    import os

    from tqdm import tqdm

    from seqtopk.testing.vllm_parallel import BIND_ENV, one_core_per_rank

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    binding = one_core_per_rank(2)
    report = {"setup": dict(families=args.families, layouts=args.layouts, settings=SETTINGS, prompt_tokens=len(PROMPT),
                            max_tokens=MAX_TOKENS, **{BIND_ENV: binding}, cpus=os.cpu_count()), "runs": {}}
    cases = [(family, layout) for family in args.families for layout in args.layouts]
    with tempfile.TemporaryDirectory() as tmp, tqdm(cases, desc="engines", unit="engine") as progress:
        for family, layout in progress:
            progress.set_postfix_str(f"{family} {layout}")
            run = verify(family, layout, Path(tmp))
            report["runs"][f"{family} {layout}"] = run
            save(report, args.out)
            if run["passed"]:
                verdict = "pass"
            elif "error" in run:
                verdict = "did not run: " + run["error"][:200]
            else:
                verdict = "FAIL: " + ", ".join(name for name, ok in run["checks"].items() if not ok)
            tqdm.write(f"{family} {layout}: {verdict} ({run['seconds']} s)")
    return 0 if all(run["passed"] for run in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
