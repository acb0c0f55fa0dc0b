"""`seqtopk lm-eval`: run lm-evaluation-harness tasks on a transformers MoE model with SeqTopK routing."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lm-eval", help="evaluate a patched transformers model with lm-evaluation-harness",
        description=__doc__ + " Local tasks shipped in seqtopk/lm_eval/tasks (arc_easy_local, "
        "arc_challenge_local, lambada_openai_local) read ../shared/data; any installed lm-eval task name works too.")
    p.add_argument("--model", required=True, help="checkpoint directory (transformers format)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=float, default=None, help="documents per task (int) or fraction")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--tasks-dir", default=None, help="directory of task YAMLs (default: the ones shipped in seqtopk/lm_eval/tasks)")
    p.add_argument("--stock", action="store_true", help="evaluate the model's own TopK routing instead")
    p.add_argument("--seqtopk", default="{}", metavar="JSON",
                   help='seqtopk.patch settings, e.g. \'{"k": 2, "cap": 4}\' (prefill defaults to "causal" here)')
    p.add_argument("--output", default=None, help="write the full results JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from seqtopk.lm_eval import run_lm_eval

    try:
        settings = None if args.stock else json.loads(args.seqtopk)
    except json.JSONDecodeError as err:
        raise ValueError(f"--seqtopk is not valid JSON: {err}") from None
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_lm_eval(args.model, [t.strip() for t in args.tasks.split(",") if t.strip()], settings,
                          limit=limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          tasks_dir=args.tasks_dir)
    for task, metrics in results["results"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print(task, json.dumps(shown))
    if "seqtopk" in results:
        print("experts per token (mean over layers):",
              round(sum(results["seqtopk"]["routing"]["experts_per_token"])
                    / max(1, len(results["seqtopk"]["routing"]["layers"])), 3))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0
