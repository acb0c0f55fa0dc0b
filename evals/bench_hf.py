"""Speed of SeqTopK vs stock TopK in transformers, measured side by side in one run.

Phases, each at the same per-token budget k (SeqTopK with exact_budget, so prefill spends exactly T*k pairs):
- prefill throughput (tokens/s of one forward over B x T tokens);
- decode throughput (generated tokens/s of greedy generate with a KV cache);
- selection step (per-token torch.topk vs SeqTopK's capped top-k + sequence cut, same score tensor);
- expert compute vs assignments (pairs actually run through the experts).
A third variant, "padded", is the straightforward implementation SeqTopK is measured against: every token
gets cap slots and unchosen ones are filled with a duplicate expert at weight 0 (safe, but they cost compute).

    python evals/bench_hf.py                       # CPU, small OLMoE-like shape
    python evals/bench_hf.py --shape olmoe --device cuda   # OLMoE-1B-7B shape on a GPU (bf16)

Writes evals/results/hf_bench_<device>.json and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    # OLMoE-1B-7B: 64 experts, top-8, hidden 2048, expert width 1024, 16 layers.
    "olmoe": dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                  prefill=(8, 2048), decode_batch=32, prompt=128, new_tokens=64, dtype="bfloat16"),
    # Same routing shape (64 experts, top-8), narrow enough for 2 CPU cores.
    "cpu-small": dict(hidden_size=256, intermediate_size=128, num_experts=64, num_experts_per_tok=8,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
                      prefill=(4, 512), decode_batch=8, prompt=64, new_tokens=32, dtype="float32"),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def build_model(shape: dict, device: str):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    keys = ("hidden_size", "intermediate_size", "num_experts", "num_experts_per_tok", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    config = OlmoeConfig(**{k: shape[k] for k in keys}, max_position_embeddings=4096, norm_topk_prob=False,
                         initializer_range=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    dtype = getattr(torch, shape["dtype"])
    with torch.device(device):
        model = OlmoeForCausalLM(config).to(dtype).eval()
    return model


def pad_unchosen(model):
    """The straightforward baseline: unchosen slots run a duplicate of the token's best expert at weight 0."""
    from seqtopk.engines.hf import require_patch

    for layer in require_patch(model).layers:
        experts = layer.family.experts(layer.block)
        compact = experts.forward

        def padded(hidden, ids, weights, _compact=compact):
            unchosen = ids < 0
            return _compact(hidden, torch.where(unchosen, ids[:, :1], ids), weights.masked_fill(unchosen, 0))

        experts.forward = padded


VARIANTS = ("stock", "seqtopk", "padded")


def set_variant(model, variant: str, k: int) -> None:
    import seqtopk

    seqtopk.unpatch(model)
    if variant != "stock":
        seqtopk.patch(model, k=k, cap=k + 2, exact_budget=True)
        if variant == "padded":
            pad_unchosen(model)


def bench_model(model, shape, device, reps):
    k = shape["num_experts_per_tok"]
    gen = torch.Generator().manual_seed(0)
    b, t = shape["prefill"]
    prefill_ids = torch.randint(3, shape["vocab_size"], (b, t), generator=gen).to(device)
    db = shape["decode_batch"]
    prompt = torch.randint(3, shape["vocab_size"], (db, shape["prompt"]), generator=gen).to(device)
    n_new = shape["new_tokens"]

    def prefill():
        with torch.no_grad():
            model(prefill_ids, use_cache=False)

    def decode():
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                           min_new_tokens=n_new, do_sample=False, pad_token_id=0)

    times = {phase: {v: [] for v in VARIANTS} for phase in ("prefill", "decode")}
    for variant in VARIANTS:  # warm-up (kernels, allocator, compile caches)
        set_variant(model, variant, k)
        prefill()
        decode()
    for rep in range(reps):  # interleaved so drift and neighbours' load hit every variant alike
        for variant in VARIANTS:
            set_variant(model, variant, k)
            times["prefill"][variant].append(timed(prefill, device))
            times["decode"][variant].append(timed(decode, device))
        print(f"rep {rep + 1}/{reps}: " + ", ".join(
            f"{v} prefill {b * t / times['prefill'][v][-1]:.0f} tok/s decode {db * n_new / times['decode'][v][-1]:.1f} tok/s"
            for v in VARIANTS), flush=True)
    out = {}
    for phase, tokens in (("prefill", b * t), ("decode", db * n_new)):
        rates = {v: tokens / statistics.median(times[phase][v]) for v in VARIANTS}
        out[phase] = {"tokens_per_s": rates, "ratio_seqtopk_vs_stock": rates["seqtopk"] / rates["stock"],
                      "ratio_padded_vs_stock": rates["padded"] / rates["stock"],
                      "batch": b if phase == "prefill" else db, "tokens": t if phase == "prefill" else n_new}
    out["assignments"] = measure_assignments(model, k, prefill_ids)
    return out


def measure_assignments(model, k, prefill_ids):
    """(token, expert) rows that actually run through the experts, per token, for each variant."""
    blocks = [m for m in model.modules() if type(m).__name__ == "OlmoeSparseMoeBlock"]
    experts_cls = type(blocks[0].experts)
    original = experts_cls.forward
    counted = {"rows": 0}

    def counting(self, hidden, ids, weights, *args, **kwargs):
        counted["rows"] += ids.numel()
        return original(self, hidden, ids, weights, *args, **kwargs)

    experts_cls.forward = counting  # patched before each variant is installed, so every path is counted
    result = {}
    try:
        for variant in VARIANTS:
            set_variant(model, variant, k)
            counted["rows"] = 0
            with torch.no_grad():
                model(prefill_ids, use_cache=False)
            result[variant] = counted["rows"] / (prefill_ids.numel() * len(blocks))
    finally:
        experts_cls.forward = original
        set_variant(model, "stock", k)
    return {"expert_rows_per_token": result, "budget_per_token": k}


def bench_selection(shape, device, reps):
    from seqtopk.selection import capped_candidates, select_causal, select_sequence

    k, e = shape["num_experts_per_tok"], shape["num_experts"]
    b, t = shape["prefill"]
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(b * t, e, generator=gen).to(device).softmax(-1)

    def stock():
        torch.topk(probs, k, dim=-1)

    def sequence():
        values, _ = capped_candidates(probs, k + 2)
        select_sequence(values.view(b, t, k + 2), None, k, 1, True)

    def causal():
        values, _ = capped_candidates(probs, k + 2)
        select_causal(values.view(b, t, k + 2), None, k, 1, True)

    fns = {"topk": stock, "seqtopk_sequence": sequence, "seqtopk_causal": causal}
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(reps * 5):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    ms = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    return {"ms": ms, "ratio_sequence_vs_topk": ms["seqtopk_sequence"] / ms["topk"],
            "ratio_causal_vs_topk": ms["seqtopk_causal"] / ms["topk"], "tokens": b * t, "experts": e}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["prefill", "decode"]
    seq = [result[p]["ratio_seqtopk_vs_stock"] for p in labels]
    pad = [result[p]["ratio_padded_vs_stock"] for p in labels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(labels))
    ax1.bar([x - 0.2 for x in xs], seq, width=0.4, label="SeqTopK (compact)")
    ax1.bar([x + 0.2 for x in xs], pad, width=0.4, label="SeqTopK padded (baseline)")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(0.98, color="r", ls="--", lw=0.8, label="target 0.98")
    ax1.set_xticks(list(xs), labels)
    ax1.set_ylabel("throughput / stock TopK")
    ax1.set_ylim(0, 1.2)
    ax1.legend(loc="lower right", fontsize=8)
    sel = result["selection"]["ms"]
    ax2.bar(list(sel), list(sel.values()), color=["gray", "C0", "C2"])
    ax2.set_ylabel("ms per call")
    ax2.set_title(f"selection step ({result['selection']['tokens']} tokens x {result['selection']['experts']} experts)")
    fig.suptitle(f"seqtopk vs stock TopK, transformers, {result['device_name']} ({result['shape']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON path (default evals/results/hf_bench_<device>.json)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"building {args.shape} model on {args.device} ({device_name})", flush=True)
    model = build_model(shape, args.device)
    import transformers

    result = {"shape": args.shape, "device": args.device, "device_name": device_name,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "experts_implementation": getattr(model.config, "_experts_implementation", None),
              "config": {k: v for k, v in shape.items()}, "reps": args.reps,
              "settings": {"k": shape["num_experts_per_tok"], "cap": shape["num_experts_per_tok"] + 2,
                           "exact_budget": True, "prefill": "sequence", "decode": "expert_cache"}}
    result.update(bench_model(model, shape, args.device, args.reps))
    result["selection"] = bench_selection(shape, args.device, args.reps)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"hf_bench_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for phase in ("prefill", "decode"):
        r = result[phase]
        print(f"{phase}: stock {r['tokens_per_s']['stock']:.1f} tok/s, seqtopk {r['tokens_per_s']['seqtopk']:.1f} "
              f"(ratio {r['ratio_seqtopk_vs_stock']:.3f}), padded {r['tokens_per_s']['padded']:.1f} "
              f"(ratio {r['ratio_padded_vs_stock']:.3f})")
    s = result["selection"]
    print(f"selection: topk {s['ms']['topk']:.3f} ms, seqtopk {s['ms']['seqtopk_sequence']:.3f} ms "
          f"(x{s['ratio_sequence_vs_topk']:.2f}), causal {s['ms']['seqtopk_causal']:.3f} ms (x{s['ratio_causal_vs_topk']:.2f})")
    print(f"expert rows per token: {json.dumps(result['assignments'])}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
