"""Train CSR and CSRv2 heads at several k and seeds and score them, with the dense baselines, on the local MTEB tasks.

Rows: dense all-MiniLM-L6-v2 (384-d); the same embedding truncated to its first k dimensions (the
MRL-style baseline at the same number of active dimensions); per seed: CSR, CSRv2 (k annealing + supervised
contrastive, frozen backbone), the pieces of CSRv2 one at a time: CSR + annealing (csr+anneal), CSR +
SupCon labels (csr+supcon); with the backbone fine-tuned end to end after the head (--finetune-steps):
CSRv2 (csrv2-ft, at --finetune-ks) and CSR (csr-ft, at --csr-ft-ks); and the MRL reference (mrl, a linear
--mrl-dims head trained with CSRv2's data and loss on the frozen backbone). Each (method, k) gets the mean and
spread (sample std) over the seeds; each comparison is paired by seed: mean and spread of the per-seed
differences, and each claim of the CSRv2 paper a verdict (on par: within 1 point, paired by seed).

Rows already in the --out JSON that this run does not produce are kept (a run of some methods never drops
another's rows). Heads are kept under --workdir and reused when their recorded training config matches, and
a fine-tuning run stops at --time-limit with a checkpoint and goes on from it when the sweep runs again, so a
long sweep runs in parts. Heavy (minutes a head): run it under `flock -s /tmp/seqtopk-quiet.lock` with
OMP_NUM_THREADS=1. Writes evals/results/csr_mteb.{json,md,png}.

    .venv/bin/python evals/csr_mteb_sweep.py --ks 2,4,8 --seeds 0,1,2            # the frozen-backbone run
    .venv/bin/python evals/csr_mteb_sweep.py --ks 2,8 --methods csrv2-ft,csr-ft,mrl --seeds 0 --time-limit 8
    .venv/bin/python evals/csr_mteb_sweep.py --ks 8 --methods csr --tasks stsb   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TASK_LABELS = {
    "SciFact-local": "SciFact nDCG@10",
    "STSBenchmark-local": "STS-B Spearman",
    "SICK-R-test-local": "SICK-R (test) Spearman",
    "Banking77Classification-local": "Banking77 accuracy",
}


# method -> (TrainConfig.method, supervised contrastive, backbone fine-tuning)
METHODS = {"csr": ("csr", False, False), "csrv2": ("csrv2", True, False), "csr+anneal": ("csrv2", False, False),
           "csr+supcon": ("csr", True, False), "csrv2-ft": ("csrv2", True, True), "csr-ft": ("csr", False, True),
           "mrl": ("mrl", True, False)}
COMPARISONS = [(method, 2, "csr", 8) for method in ("csrv2", "csr+anneal", "csr+supcon", "csrv2-ft")] + [
    ("csrv2-ft", 2, "csr-ft", 8), ("csrv2-ft", 2, "mrl", 32), ("csrv2-ft", 2, "csrv2", 2), ("csrv2-ft", 8, "csrv2-ft", 2),
    ("csr-ft", 8, "csr", 8), ("csrv2", 2, "mrl", 32)]
ON_PAR_POINTS = 1.0  # "on par": the mean per-seed difference is within this many points
DEAD_CLAIM = 0.25  # "dead latents ~20%": at most this fraction on held-out text


class Paused(Exception):
    """A fine-tuning run stopped at --time-limit with its checkpoint written."""


def head_config(method: str, k: int, seed: int, args):
    from seqtopk.sparse.csr.train import TrainConfig

    base, supervised, finetune = METHODS[method]
    tuning = dict(finetune_steps=args.finetune_steps, finetune_batch_size=args.finetune_batch_size,
                  backbone_lr=args.backbone_lr) if finetune else {}
    return TrainConfig(k=k, method=base, supervised=supervised, max_steps=args.steps, seed=seed, **tuning)


def trained_head(method: str, k: int, seed: int, args, backbone: Path) -> Path | None:
    """Train (or reuse) one head; reuse only when the saved config equals the requested one. A fine-tuning run
    that reaches --time-limit raises Paused (its checkpoint is resumed by the next sweep)."""
    from seqtopk.sparse.csr.train import train_head

    folder = args.workdir / f"{method}-k{k}-seed{seed}"
    config = head_config(method, k, seed, args)
    summary_path = folder / "csr_training.json"
    if summary_path.is_file():
        saved = json.loads(summary_path.read_text())["config"]
        wanted = {**asdict(config), "weights": asdict(config.weights)}
        if all(saved.get(key) == (list(value) if isinstance(value, tuple) else value) for key, value in wanted.items()):
            print(f"reusing {folder}", flush=True)
            return folder
    if args.only_trained:
        print(f"not trained, skipped (--only-trained): {folder}", flush=True)
        return None
    print(f"training {folder}", flush=True)
    start = time.perf_counter()
    left = None if args.time_limit is None else max(0.0, 60 * args.time_limit - (time.monotonic() - args.started))
    if left == 0.0:
        raise Paused(f"{folder}: not started, the time limit is spent")
    summary = train_head(backbone, folder, config, overwrite=True, progress=not args.quiet, resume=True, time_limit_s=left)
    if summary.get("paused"):
        raise Paused(f"{folder}: {summary['stage']} step {summary['step']} of {summary['total_steps']}")
    print(f"  trained in {time.perf_counter() - start:.0f}s", flush=True)
    return folder


def scored_head(head: Path, tasks: list[str]) -> dict:
    """The head's MTEB row, kept beside it (sweep_scores.json) and reused while the head and tasks are the same."""
    from seqtopk.sparse.csr.evaluate import evaluate_heads, evaluate_mrl, training_summary

    saved = head / "sweep_scores.json"
    stamp = (head / "csr_training.json").stat().st_mtime_ns
    if saved.is_file():
        kept = json.loads(saved.read_text())
        if kept.get("tasks") == tasks and kept.get("trained_at") == stamp:
            return kept["row"]
    summary = training_summary(head)
    row = evaluate_mrl(head, tasks) if summary.get("method") == "mrl" else evaluate_heads([head], tasks)[0]
    # exactly what ran: the training settings and steps of this head
    row["training"] = {key: summary["config"][key] for key in ("max_steps", "batch_size", "lr", "finetune_steps",
                                                                "finetune_batch_size", "backbone_lr", "backbone_warmup",
                                                                "backbone_schedule", "finetune_head_lr", "k_start")}
    saved.write_text(json.dumps({"tasks": tasks, "trained_at": stamp, "row": row}, indent=2) + "\n")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="2,4,8,16,32")
    parser.add_argument("--methods", default="csr,csrv2,csr+anneal,csr+supcon,csrv2-ft,csr-ft,mrl",
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--piece-ks", default="2", help="k values that get the one-piece rows (csr+anneal, csr+supcon)")
    parser.add_argument("--finetune-ks", default="2,8", help="k values that get csrv2-ft (backbone fine-tuning)")
    parser.add_argument("--csr-ft-ks", default="8", help="k values that get csr-ft (CSR with backbone fine-tuning)")
    parser.add_argument("--mrl-dims", type=int, default=32, help="dimensions of the MRL reference head (method mrl)")
    parser.add_argument("--steps", type=int, default=1500, help="head training steps")
    parser.add_argument("--finetune-steps", type=int, default=150, help="end-to-end steps of the -ft methods")
    parser.add_argument("--finetune-batch-size", type=int, default=16, help="pairs per fine-tuning step")
    parser.add_argument("--backbone-lr", type=float, default=5e-5, help="peak backbone rate (warmup 10%%, linear decay)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop training at this wall time with a checkpoint (run the sweep again to go on)")
    parser.add_argument("--tasks", default="scifact,stsb,sickr,banking77")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--workdir", type=Path, default=None, help="where heads are kept (default: $SEQTOPK_CACHE/heads)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep low on shared machines)")
    parser.add_argument("--only-trained", action="store_true",
                        help="score the heads already trained and skip the others (assemble a sweep run in parts)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train and score nothing: rebuild summary, comparisons, verdicts, .md and .png from the rows "
                        "already in the --out JSON (with --incomplete naming the runs that did not finish)")
    parser.add_argument("--incomplete", action="append", default=[], metavar="RUN",
                        help="with --summarise-only: a run that was started but did not finish, recorded under incomplete")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "csr_mteb")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from seqtopk.sparse.csr.evaluate import evaluate_dense
    from seqtopk.paths import cache_dir
    from seqtopk.sparse.backbone import default_backbone

    if args.summarise_only:
        recorded = json.loads(args.out.with_suffix(".json").read_text())
        return write_result(args, {**recorded, "incomplete": args.incomplete}, recorded["rows"])
    args.workdir = args.workdir or cache_dir("heads")
    ks = [int(k) for k in args.ks.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    finetune_ks = {int(k) for k in args.finetune_ks.split(",") if k}
    piece_ks = {int(k) for k in args.piece_ks.split(",") if k}
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    tasks = [t.strip() for t in args.tasks.split(",")]
    backbone = default_backbone()

    csr_ft_ks = {int(k) for k in args.csr_ft_ks.split(",") if k}
    args.started = time.monotonic()
    rows, paused = [evaluate_dense(backbone, tasks)], []
    print(json.dumps(rows[-1]), flush=True)

    def add_rows(method: str, k: int) -> None:
        for seed in seeds:
            try:
                head = trained_head(method, k, seed, args, backbone)
            except Paused as stop:
                print(f"paused (run the sweep again to go on): {stop}", flush=True)
                paused.append(str(stop))
                continue
            if head is None:
                continue
            row = scored_head(head, tasks)
            row.update(method=method, seed=seed)
            rows.append(row)
            print(json.dumps(row), flush=True)

    wanted = {"csrv2-ft": finetune_ks, "csr-ft": csr_ft_ks, "csr+anneal": piece_ks, "csr+supcon": piece_ks}
    for k in ks:
        rows.append(evaluate_dense(backbone, tasks, dims=k))
        print(json.dumps(rows[-1]), flush=True)
        for method in methods:
            if method != "mrl" and k in wanted.get(method, {k}):
                add_rows(method, k)
    if "mrl" in methods:
        rows.append(evaluate_dense(backbone, tasks, dims=args.mrl_dims))
        add_rows("mrl", args.mrl_dims)

    rows = merged_rows(args.out.with_suffix(".json"), rows)
    setup = {"backbone": str(backbone), "steps": args.steps, "incomplete": paused,
             "finetune": {"steps": args.finetune_steps, "batch_size": args.finetune_batch_size, "backbone_lr": args.backbone_lr}}
    return write_result(args, setup, rows)


def write_result(args, setup: dict, rows: list[dict]) -> int:
    """The JSON (rows, summary, paired differences, verdicts), its .md and .png; 3 when some run did not finish."""
    result = {key: setup[key] for key in ("backbone", "steps", "finetune", "incomplete") if key in setup}
    result.update(seeds=sorted({r["seed"] for r in rows if r.get("seed") is not None}), rows=rows, summary=summarise(rows),
                  paired_differences=[c for c in (compare(rows, *spec) for spec in COMPARISONS) if c])
    result["verdicts"] = verdicts(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    return 3 if result.get("incomplete") else 0


def merged_rows(previous: Path, rows: list[dict]) -> list[dict]:
    """The rows of the previous result, each replaced by this run's row of the same (method, k, seed), then this
    run's new rows: a sweep of some methods keeps the rows of the others as they were recorded."""
    def key(row):
        return row["method"], row["k"], row.get("seed")

    fresh = {key(r): r for r in rows}
    old = json.loads(previous.read_text())["rows"] if previous.is_file() else []
    kept = [fresh.pop(key(r), r) for r in old]
    return kept + [r for r in rows if key(r) in fresh]


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), in points."""
    v = 100 * np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, k): each task's mean and spread over seeds, and the dead-latent fraction's."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["k"]), []).append(r)
    out = []
    for (method, k), group in groups.items():
        dead = [r["dead_latent_fraction_heldout"] for r in group if r.get("dead_latent_fraction_heldout") is not None]
        out.append({"method": method, "k": k, "seeds": [r.get("seed") for r in group],
                    "scores": {t: spread([r["scores"][t] for r in group]) for t in group[0]["scores"]},
                    "dead_latent_fraction_heldout": spread(dead) if dead else None})
    return out


def compare(rows, method: str, k: int, base: str, base_k: int) -> dict | None:
    """(method at k) minus (base at base_k), paired by seed: per-seed differences, their mean and spread."""
    a = {r["seed"]: r for r in rows if r["method"] == method and r["k"] == k}
    b = {r["seed"]: r for r in rows if r["method"] == base and r["k"] == base_k}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    tasks = list(a[seeds[0]]["scores"])
    return {"a": f"{method}@k={k}", "b": f"{base}@k={base_k}", "seeds": seeds,
            "differences": {t: {**spread([a[s]["scores"][t] - b[s]["scores"][t] for s in seeds]),
                                "per_seed": [100 * (a[s]["scores"][t] - b[s]["scores"][t]) for s in seeds]}
                            for t in tasks}}


CLAIMS = [  # (claim, compared method at k, against method at k, or None for the dead-latent claim) of the CSRv2 paper
    ("CSRv2 at k=2, backbone fine-tuned, is on par with CSR at k=8 (frozen backbone, as the original CSR)", ("csrv2-ft", 2), ("csr", 8)),
    ("CSRv2 at k=2 is on par with CSR at k=8, both with the backbone fine-tuned", ("csrv2-ft", 2), ("csr-ft", 8)),
    ("CSRv2 at k=2, backbone fine-tuned, is on par with MRL at 32 dimensions", ("csrv2-ft", 2), ("mrl", 32)),
    ("CSRv2 at k=2, backbone fine-tuned, leaves about 20% of latents dead on held-out text", ("csrv2-ft", 2), None),
    ("CSRv2 at k=2 on the frozen backbone is on par with CSR at k=8", ("csrv2", 2), ("csr", 8)),
    ("CSRv2 at k=2 on the frozen backbone leaves about 20% of latents dead on held-out text", ("csrv2", 2), None),
]


def verdicts(result: dict) -> list[dict]:
    """One verdict per claim: on par when the mean per-seed difference is within ON_PAR_POINTS on a task (better
    counts as holding too); the claim holds when it holds on every task. Dead latents: at most DEAD_CLAIM."""
    out = []
    for claim, (a, ka), against in CLAIMS:
        if against is None:
            out.append(_dead_verdict(result, claim, a, ka))
            continue
        b, kb = against
        c = next((c for c in result["paired_differences"] if c["a"] == f"{a}@k={ka}" and c["b"] == f"{b}@k={kb}"), None)
        if c is None:
            out.append({"claim": claim, "a": f"{a}@k={ka}", "b": f"{b}@k={kb}", "seeds": [], "verdict": "not run"})
            continue
        per_task = {t: {"mean": d["mean"], "verdict": "on par" if abs(d["mean"]) <= ON_PAR_POINTS else
                        ("better" if d["mean"] > 0 else "worse")} for t, d in c["differences"].items()}
        holds = all(v["verdict"] != "worse" for v in per_task.values())
        out.append({"claim": claim, "a": c["a"], "b": c["b"], "seeds": c["seeds"], "per_task": per_task,
                    "verdict": "holds" if holds else "does not hold"})
    for v in out:  # flat fields, for docs pages that read single values
        v["n_seeds"] = len(v["seeds"])
        if "per_task" in v:
            v["detail"] = "; ".join(f"{TASK_LABELS.get(t, t)} {d['mean']:+.1f} ({d['verdict']})" for t, d in v["per_task"].items())
        elif "dead_percent" in v:
            v["detail"] = f"{v['dead_percent']:.1f}% dead"
        else:
            v["detail"] = "not run: no fine-tuned rows for this comparison"
    return out


def _dead_verdict(result: dict, claim: str, method: str, k: int) -> dict:
    row = next((r for r in result["summary"] if r["method"] == method and r["k"] == k), None)
    claim = f"{claim} (at most {DEAD_CLAIM:.0%})"
    if row is None or row["dead_latent_fraction_heldout"] is None:
        return {"claim": claim, "a": f"{method}@k={k}", "seeds": [], "verdict": "not run"}
    fraction = row["dead_latent_fraction_heldout"]
    return {"claim": claim, "a": f"{method}@k={k}", "seeds": [s for s in row["seeds"] if s is not None],
            "dead_percent": fraction["mean"], "dead_percent_std": fraction["std"],
            "verdict": "holds" if fraction["mean"] <= 100 * DEAD_CLAIM else "does not hold"}


NAMES = {"dense": "dense MiniLM", "dense-truncated": "dense, first k dims", "csr": "CSR", "csrv2": "CSRv2 (frozen backbone)",
         "csr+anneal": "CSR + k annealing", "csr+supcon": "CSR + SupCon labels", "csrv2-ft": "CSRv2 + backbone FT",
         "csr-ft": "CSR + backbone FT", "mrl": "MRL reference (linear head, frozen)"}


def markdown(result: dict) -> str:
    summary = result["summary"]
    tasks = list(summary[0]["scores"])
    lines = [f"Mean ± sample std over seeds {result['seeds']} (dense rows: one deterministic run).", "",
             "| model | k (active dims) | seeds | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | dead latents (held-out) |",
             "|" + "---|" * (len(tasks) + 4)]
    for r in summary:
        k = r["k"] if r["k"] is not None else 384
        cells = " | ".join(f"{s['mean']:.1f} ± {s['std']:.1f}" if s["n"] > 1 else f"{s['mean']:.1f}" for s in r["scores"].values())
        dead = r["dead_latent_fraction_heldout"]
        n = len([s for s in r["seeds"] if s is not None])
        dead_cell = "" if dead is None else f"{dead['mean']:.1f}%"
        lines.append(f"| {NAMES.get(r['method'], r['method'])} | {k} | {n or ''} | {cells} | {dead_cell} |")
    lines += ["", "Paired by seed (points; mean ± std of the per-seed differences, then each seed's):", ""]
    for c in result["paired_differences"]:
        diffs = "; ".join(f"{TASK_LABELS.get(t, t)} {d['mean']:+.1f} ± {d['std']:.1f} "
                          f"({', '.join(f'{v:+.1f}' for v in d['per_seed'])})" for t, d in c["differences"].items())
        lines.append(f"- {c['a']} minus {c['b']} (seeds {c['seeds']}): {diffs}")
    lines += ["", f"Claims of the CSRv2 paper (on par: within {ON_PAR_POINTS:g} point, paired by seed):", ""]
    for v in result.get("verdicts", []):
        lines.append(f"- {v['claim']} — **{v['verdict']}** (seeds {v['seeds']}): {v['detail']}")
    if result.get("incomplete"):
        lines += ["", "Not finished in this run (paused or not started): " + "; ".join(result["incomplete"])]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    tasks = list(summary[0]["scores"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    styles = {"dense-truncated": ("dense, first k dims", "#888888", "o"), "csr": ("CSR", "#3b7dd8", "o"),
              "csrv2": ("CSRv2", "#e08a2c", "o"), "csr+anneal": ("CSR + anneal", "#9467bd", "^"),
              "csr+supcon": ("CSR + SupCon", "#8c564b", "v"), "csrv2-ft": ("CSRv2 + FT", "#2ca25f", "s"),
              "csr-ft": ("CSR + FT", "#17becf", "s"), "mrl": ("MRL-32 reference", "#d62728", "D")}
    dense = next(r for r in summary if r["method"] == "dense")
    for ax, task in zip(axes[0], tasks):
        for method, (label, color, marker) in styles.items():
            points = sorted((r["k"], r["scores"][task]["mean"], r["scores"][task]["std"]) for r in summary
                            if r["method"] == method)
            if points:
                ks, means, stds = zip(*points)
                ax.errorbar(ks, means, yerr=stds, marker=marker, label=label, color=color, capsize=3)
        ax.axhline(dense["scores"][task]["mean"], color="black", linestyle="--", linewidth=1, label="dense 384-d")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("active dimensions k (mean ± std over seeds)")
        ax.set_title(TASK_LABELS.get(task, task))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
