"""Serving speed of SeqTopK vs stock TopK routing in vLLM, measured side by side in one run.

Three engines on the same checkpoint live at once: stock TopK, SeqTopK with the default prefill rule
("sequence") and with prefill="causal", all at the same per-token budget k (the model's top_k) and with the
same engine features (no chunked prefill, no prefix caching, as the sequence rule needs). Rounds are
interleaved (topk, sequence, causal, topk, ...) so machine noise hits all three alike. Each round sends
`--requests` concurrent requests; reported per engine (median over rounds): output tokens/s, mean
time-to-first-token, and the experts per token actually spent. Also: SeqTopK's routing state per token next
to the KV cache's bytes per token, measured from the running engine, plus the same ratio for real model
shapes (from their published configs).

    python evals/bench_vllm.py                 # CPU, small Qwen3-MoE-like shape (64 experts, top-8)
    python evals/bench_vllm.py --shape wide    # hidden 512, 128 experts, top-8

Writes evals/results/vllm_bench_cpu.json (vllm_bench_cpu_wide.json for --shape wide) and a PNG next to it.
Also recorded per engine: experts chosen per token and expert rows computed per token (SeqTopK layers
without shared experts run only the chosen pairs).
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
ENGINES = {"topk": None, "seqtopk-sequence": {}, "seqtopk-causal": {"prefill": "causal"}}

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


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 300) for _ in range(length)] for _ in range(count)]


def one_round(llm, batch, max_tokens: int) -> dict:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
    return {"wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_mean_s": statistics.mean(ttft) if ttft else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
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
    from vllm import LLM

    from seqtopk.testing.tiny import cached_checkpoint

    path = cached_checkpoint("qwen3_moe", **shape)
    k = shape["num_experts_per_tok"]
    engines = {}
    for name, settings in ENGINES.items():
        extra = {} if settings is None else {"additional_config": {"seqtopk": {"k": k, **settings}}}
        engines[name] = LLM(str(path), dtype=args.dtype, max_model_len=512, max_num_seqs=args.requests,
                            enable_chunked_prefill=False, enable_prefix_caching=False, disable_log_stats=False,
                            seed=0, **extra)
    batch = prompts(args.requests, args.prompt_len, seed=0)
    rounds = {name: [] for name in engines}
    for name, llm in engines.items():  # warm-up: first-call compilation and allocation
        one_round(llm, batch, 4)
    for r in range(args.rounds):
        for name, llm in engines.items():
            batch = prompts(args.requests, args.prompt_len, seed=1 + r)
            rounds[name].append(one_round(llm, batch, args.max_tokens))
            print(name, r, rounds[name][-1], flush=True)
    stats = {name: llm.collective_rpc("seqtopk_stats")[0]
             for name, llm in engines.items() if ENGINES[name] is not None}
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()

    summary = {name: {"output_tokens_per_s": statistics.median(x["output_tokens_per_s"] for x in runs),
                      "ttft_mean_s": statistics.median(x["ttft_mean_s"] for x in runs)}
               for name, runs in rounds.items()}
    base = summary["topk"]
    ratios = {name: {"output_tokens_per_s": s["output_tokens_per_s"] / base["output_tokens_per_s"],
                     # >= 1 is as fast as TopK: TopK's time to first token over SeqTopK's
                     "ttft": base["ttft_mean_s"] / s["ttft_mean_s"]}
              for name, s in summary.items() if name != "topk"}
    memory = {}
    for name, s in stats.items():
        memory[name] = {"state_bytes_per_token": s["state_bytes_per_token"],
                        "kv_bytes_per_token": s["kv_bytes_per_token"],
                        "state_over_kv": s["state_bytes_per_token"] / s["kv_bytes_per_token"],
                        "experts_per_token_prompt": s["prompt"], "experts_per_token_generated": s["generated"],
                        "expert_rows_per_token": s["expert_rows"]}
    real = {model: {"kv_bytes_per_token_layer": v["kv"], "state_bytes_per_token_layer": 4 * (v["k"] + 2),
                    "state_over_kv": 4 * (v["k"] + 2) / v["kv"]} for model, v in REAL_SHAPES.items()}
    result = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "vllm": vllm.__version__, "torch": torch.__version__, "shape_name": args.shape, "shape": shape, "dtype": args.dtype,
        "requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "rounds": rounds, "summary": summary, "ratio_vs_topk": ratios, "target_ratio": 0.97,
        "memory": memory, "memory_target": 0.02, "memory_real_shapes": real,
        "expert_rows": "SeqTopK layers without shared experts run only the chosen (token, expert) pairs, as "
                       "rows of one expert each; TopK runs k slots per token",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"summary": summary, "ratio_vs_topk": ratios, "memory": memory}, indent=2))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in [(axes[0], "output_tokens_per_s", "output tokens/s (higher is better)"),
                           (axes[1], "ttft_mean_s", "mean time to first token, s (lower is better)")]:
        values = [result["summary"][n][key] for n in names]
        ax.bar(names, values, color=["grey", "tab:blue", "tab:green"][: len(names)])
        ax.set_title(label, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=9)
    fig.suptitle(f"vLLM-cpu {result['vllm']}, {result['shape_name']} shape: {result['requests']} concurrent requests, "
                 f"prompt {result['prompt_len']}, {result['max_tokens']} new tokens, {result['dtype']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
