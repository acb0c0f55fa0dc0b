"""Train CSR and CSRv2 heads at several k and seeds and score them, with the dense baselines, on the local MTEB tasks.

Rows: dense all-MiniLM-L6-v2 (384-d); the same embedding truncated to its first k dimensions (the
MRL-style baseline at the same number of active dimensions); per seed: CSR, CSRv2 (k annealing + supervised
contrastive, frozen backbone), and the pieces of CSRv2 one at a time: CSR + annealing (csr+anneal), CSR +
SupCon labels (csr+supcon), and for --finetune-ks CSRv2 with backbone fine-tuning (csrv2-ft). Each
(method, k) gets the mean and spread (sample std) over the seeds; each comparison (CSRv2 or a piece at k=2
minus CSR at k=8) is paired by seed: mean and spread of the per-seed differences. Heads are kept under
--workdir and reused when their recorded training config matches, so a long sweep can run in parts.
Heavy (minutes a head): run it under `flock -s /tmp/seqtopk-bench.lock`. Writes
evals/results/csr_mteb.{json,md,png}.

    .venv/bin/python evals/csr_mteb_sweep.py --ks 2,4,8 --seeds 0,1,2            # the recorded run
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
           "csr+supcon": ("csr", True, False), "csrv2-ft": ("csrv2", True, True)}
COMPARISONS = [(method, 2, "csr", 8) for method in ("csrv2", "csr+anneal", "csr+supcon", "csrv2-ft")]


def head_config(method: str, k: int, seed: int, args):
    from seqtopk.sparse.csr.train import TrainConfig

    base, supervised, finetune = METHODS[method]
    return TrainConfig(k=k, method=base, supervised=supervised, max_steps=args.steps,
                       finetune_steps=args.finetune_steps if finetune else 0, seed=seed)


def trained_head(method: str, k: int, seed: int, args, backbone: Path) -> Path | None:
    """Train (or reuse) one head; reuse only when the saved config equals the requested one."""
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
    train_head(backbone, folder, config, overwrite=True, progress=not args.quiet)
    print(f"  trained in {time.perf_counter() - start:.0f}s", flush=True)
    return folder


def scored_head(head: Path, tasks: list[str]) -> dict:
    """The head's MTEB row, kept beside it (sweep_scores.json) and reused while the head and tasks are the same."""
    from seqtopk.sparse.csr.evaluate import evaluate_heads

    saved = head / "sweep_scores.json"
    stamp = (head / "csr_training.json").stat().st_mtime_ns
    if saved.is_file():
        kept = json.loads(saved.read_text())
        if kept.get("tasks") == tasks and kept.get("trained_at") == stamp:
            return kept["row"]
    row = evaluate_heads([head], tasks)[0]
    saved.write_text(json.dumps({"tasks": tasks, "trained_at": stamp, "row": row}, indent=2) + "\n")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="2,4,8,16,32")
    parser.add_argument("--methods", default="csr,csrv2,csr+anneal,csr+supcon,csrv2-ft",
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--piece-ks", default="2", help="k values that get the one-piece rows (csr+anneal, csr+supcon)")
    parser.add_argument("--finetune-ks", default="2", help="k values that also get csrv2-ft (backbone fine-tuning)")
    parser.add_argument("--steps", type=int, default=1500, help="head training steps")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--tasks", default="scifact,stsb,sickr,banking77")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--workdir", type=Path, default=None, help="where heads are kept (default: $SEQTOPK_CACHE/heads)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep low on shared machines)")
    parser.add_argument("--only-trained", action="store_true",
                        help="score the heads already trained and skip the others (assemble a sweep run in parts)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "csr_mteb")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from seqtopk.sparse.csr.evaluate import evaluate_dense
    from seqtopk.paths import cache_dir
    from seqtopk.sparse.backbone import default_backbone

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

    rows = [evaluate_dense(backbone, tasks)]
    print(json.dumps(rows[-1]), flush=True)
    for k in ks:
        rows.append(evaluate_dense(backbone, tasks, dims=k))
        print(json.dumps(rows[-1]), flush=True)
        for method in methods:
            if (method == "csrv2-ft" and k not in finetune_ks) or (method.startswith("csr+") and k not in piece_ks):
                continue
            for seed in seeds:
                head = trained_head(method, k, seed, args, backbone)
                if head is None:
                    continue
                row = scored_head(head, tasks)
                row.update(method=method, seed=seed)
                rows.append(row)
                print(json.dumps(row), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"backbone": str(backbone), "steps": args.steps, "finetune_steps": args.finetune_steps, "seeds": seeds,
              "rows": rows, "summary": summarise(rows),
              "paired_differences": [c for c in (compare(rows, *spec) for spec in COMPARISONS) if c]}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    return 0


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


NAMES = {"dense": "dense MiniLM", "dense-truncated": "dense, first k dims", "csr": "CSR", "csrv2": "CSRv2 (frozen backbone)",
         "csr+anneal": "CSR + k annealing", "csr+supcon": "CSR + SupCon labels", "csrv2-ft": "CSRv2 + backbone FT"}


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
        lines.append(f"- {c['a']} minus {c['b']}: {diffs}")
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
              "csr+supcon": ("CSR + SupCon", "#8c564b", "v"), "csrv2-ft": ("CSRv2 + FT", "#2ca25f", "s")}
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
