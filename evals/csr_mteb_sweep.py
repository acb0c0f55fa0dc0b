"""Train CSR and CSRv2 heads at several k and score them, with the dense baselines, on the local MTEB tasks.

Rows: dense all-MiniLM-L6-v2 (384-d); the same embedding truncated to its first k dimensions (the
MRL-style baseline at the same number of active dimensions); CSR, CSRv2 (k annealing + supervised
contrastive, frozen backbone) and, for --finetune-ks, CSRv2 with backbone fine-tuning. Heads are kept
under --workdir and reused when their recorded training config matches. Writes
evals/results/csr_mteb.{json,md,png}.

    .venv/bin/python evals/csr_mteb_sweep.py            # the recorded run
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

RESULTS = Path(__file__).resolve().parent / "results"
TASK_LABELS = {
    "SciFact-local": "SciFact nDCG@10",
    "STSBenchmark-local": "STS-B Spearman",
    "SICK-R-test-local": "SICK-R (test) Spearman",
    "Banking77Classification-local": "Banking77 accuracy",
}


def head_config(method: str, k: int, args):
    from seqtopk.sparse.csr.train import TrainConfig

    finetune = args.finetune_steps if method == "csrv2-ft" else 0
    return TrainConfig(k=k, method="csr" if method == "csr" else "csrv2", max_steps=args.steps, finetune_steps=finetune, seed=args.seed)


def trained_head(method: str, k: int, args, backbone: Path) -> Path:
    """Train (or reuse) one head; reuse only when the saved config equals the requested one."""
    from seqtopk.sparse.csr.train import train_head

    folder = args.workdir / f"{method}-k{k}"
    config = head_config(method, k, args)
    summary_path = folder / "csr_training.json"
    if summary_path.is_file():
        saved = json.loads(summary_path.read_text())["config"]
        wanted = {**asdict(config), "weights": asdict(config.weights)}
        if all(saved.get(key) == (list(value) if isinstance(value, tuple) else value) for key, value in wanted.items()):
            print(f"reusing {folder}", flush=True)
            return folder
    print(f"training {folder}", flush=True)
    start = time.perf_counter()
    train_head(backbone, folder, config, overwrite=True, progress=not args.quiet)
    print(f"  trained in {time.perf_counter() - start:.0f}s", flush=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="2,4,8,16,32")
    parser.add_argument("--methods", default="csr,csrv2,csrv2-ft", help="comma-separated: csr, csrv2, csrv2-ft")
    parser.add_argument("--finetune-ks", default="2,8", help="k values that also get csrv2-ft (backbone fine-tuning)")
    parser.add_argument("--steps", type=int, default=1500, help="head training steps")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--tasks", default="scifact,stsb,sickr,banking77")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where heads are kept (default: $SEQTOPK_CACHE/heads)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep low on shared machines)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "csr_mteb")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from seqtopk.sparse.csr.evaluate import evaluate_dense, evaluate_heads
    from seqtopk.paths import cache_dir
    from seqtopk.sparse.backbone import default_backbone

    args.workdir = args.workdir or cache_dir("heads")
    ks = [int(k) for k in args.ks.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    finetune_ks = {int(k) for k in args.finetune_ks.split(",") if k}
    tasks = [t.strip() for t in args.tasks.split(",")]
    backbone = default_backbone()

    rows = [evaluate_dense(backbone, tasks)]
    print(json.dumps(rows[-1]), flush=True)
    for k in ks:
        rows.append(evaluate_dense(backbone, tasks, dims=k))
        print(json.dumps(rows[-1]), flush=True)
        for method in methods:
            if method == "csrv2-ft" and k not in finetune_ks:
                continue
            head = trained_head(method, k, args, backbone)
            row = evaluate_heads([head], tasks)[0]
            row["method"] = method
            rows.append(row)
            print(json.dumps(row), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"backbone": str(backbone), "steps": args.steps, "finetune_steps": args.finetune_steps, "rows": rows,
              "csrv2_k2_vs_csr_k8": compare(rows, ("csrv2", 2), ("csr", 8)),
              "csrv2_ft_k2_vs_csr_k8": compare(rows, ("csrv2-ft", 2), ("csr", 8))}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    return 0


def find(rows, method, k):
    return next((r for r in rows if r["method"] == method and r["k"] == k), None)


def compare(rows, a, b) -> dict | None:
    ra, rb = find(rows, *a), find(rows, *b)
    if not ra or not rb:
        return None
    return {task: ra["scores"][task] - rb["scores"][task] for task in ra["scores"]}


def markdown(result: dict) -> str:
    rows = result["rows"]
    tasks = list(rows[0]["scores"])
    header = "| model | k (active dims) | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | dead latents (held-out) |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    names = {"dense": "dense MiniLM", "dense-truncated": "dense, first k dims", "csr": "CSR", "csrv2": "CSRv2 (frozen backbone)", "csrv2-ft": "CSRv2 + backbone FT"}
    for r in rows:
        dead = r.get("dead_latent_fraction_heldout")
        k = r["k"] if r["k"] is not None else 384
        cells = " | ".join(f"{100 * r['scores'][t]:.1f}" for t in tasks)
        lines.append(f"| {names.get(r['method'], r['method'])} | {k} | {cells} | {'' if dead is None else f'{100 * dead:.1f}%'} |")
    for key, label in (("csrv2_k2_vs_csr_k8", "CSRv2@k=2 minus CSR@k=8"), ("csrv2_ft_k2_vs_csr_k8", "CSRv2+FT@k=2 minus CSR@k=8")):
        if result.get(key):
            diffs = ", ".join(f"{TASK_LABELS.get(t, t)} {100 * v:+.1f}" for t, v in result[key].items())
            lines.append(f"\n{label} (points): {diffs}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tasks = list(rows[0]["scores"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    styles = {"dense-truncated": ("dense, first k dims", "#888888"), "csr": ("CSR", "#3b7dd8"), "csrv2": ("CSRv2", "#e08a2c"), "csrv2-ft": ("CSRv2 + FT", "#2ca25f")}
    dense = next(r for r in rows if r["method"] == "dense")
    for ax, task in zip(axes[0], tasks):
        for method, (label, color) in styles.items():
            points = sorted((r["k"], r["scores"][task]) for r in rows if r["method"] == method)
            if points:
                ax.plot(*zip(*points), marker="o", label=label, color=color)
        ax.axhline(dense["scores"][task], color="black", linestyle="--", linewidth=1, label="dense 384-d")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("active dimensions k")
        ax.set_title(TASK_LABELS.get(task, task))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
