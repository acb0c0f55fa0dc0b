"""Speed of SeqTopK vs stock TopK in transformers, measured side by side in one run.

Phases, each at the same per-token budget k (SeqTopK with exact_budget, so prefill spends exactly T*k pairs):
- prefill throughput (tokens/s of one forward over B x T tokens);
- decode throughput (generated tokens/s of greedy generate with a KV cache);
- selection step (per-token torch.topk vs SeqTopK's capped top-k + sequence cut, same score tensor);
- expert compute vs assignments (pairs actually run through the experts).
Two more variants: "padded", the straightforward implementation (every token gets cap slots, unchosen ones
filled with a duplicate expert at weight 0: safe, but they cost compute), and "stock_rows", stock TopK routed
through seqtopk's row dispatch, which separates the cost of the routing rule from that of the dispatch.

    python evals/bench_hf.py                       # CPU, small OLMoE-like shape
    python evals/bench_hf.py --shape cpu-k4 --threads 2   # 32 experts, top-4 (cap 6), batch 4
    python evals/bench_hf.py --shape olmoe --device cuda   # OLMoE-1B-7B shape on a GPU (bf16)
    python evals/bench_hf.py --sharpness sharp             # routers redrawn N(0, 0.5^2): entropy ~0.15
    python evals/bench_hf.py --budget 4                    # both at k'=4: stock TopK-4 vs SeqTopK k=4, cap 6

--sharpness redraws every router's gate weights (near-uniform: the initializer's; trained-like: N(0, 0.2^2);
sharp: N(0, 0.5^2), as evals/bench_vllm.py does) and records the routers' normalised entropy over the prefill
tokens (softmax entropy / log E, mean over layers) beside every figure.

Writes evals/results/hf_bench_<device>.json (hf_bench_<device>_<shape>.json for shapes other than the
default of the device, with _<sharpness> added for a router other than near-uniform, and _k<budget> for a
budget other than the shape's top-k) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _routers import model_router_entropy  # noqa: E402  (evals/ is scripts, not a package)
from _results import cpu_name  # noqa: E402

SHAPES = {
    # OLMoE-1B-7B: 64 experts, top-8, hidden 2048, expert width 1024, 16 layers.
    "olmoe": dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                  prefill=(8, 2048), decode_batch=32, prompt=128, new_tokens=64, dtype="bfloat16"),
    # Same routing shape (64 experts, top-8), narrow enough for 2 CPU cores.
    "cpu-small": dict(hidden_size=256, intermediate_size=128, num_experts=64, num_experts_per_tok=8,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
                      prefill=(4, 512), decode_batch=8, prompt=64, new_tokens=32, dtype="float32"),
    # Sparser routing (32 experts, top-4, so cap 6), batch 4.
    "cpu-k4": dict(hidden_size=256, intermediate_size=128, num_experts=32, num_experts_per_tok=4,
                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
                   prefill=(4, 512), decode_batch=4, prompt=64, new_tokens=32, dtype="float32"),
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


VARIANTS = ("stock", "seqtopk", "padded", "stock_rows")
SHARPNESS = {"near-uniform": None, "trained-like": 0.2, "sharp": 0.5}  # gate std, as evals/bench_vllm.py


def sharpen(model, std: float | None, seed: int = 0) -> None:
    """Redraw every router's gate weights N(0, std^2) (None: keep the initializer's)."""
    if std is None:
        return
    gen = torch.Generator().manual_seed(seed)
    for block in model.modules():
        if type(block).__name__ == "OlmoeSparseMoeBlock":
            weight = block.gate.weight
            weight.data.copy_((torch.randn(weight.shape, generator=gen) * std).to(weight.dtype))


def set_variant(model, variant: str, k: int) -> None:
    """stock: the model as shipped. seqtopk: patched (cap k+2, exact budget).
    padded: the same routing run the straightforward way: every token keeps cap slots, unchosen ones
    repeat its first expert at weight 0, through the model's own experts kernel.
    stock_rows: stock TopK routing, experts run through seqtopk's row dispatch (isolates dispatch from routing).
    """
    import seqtopk

    seqtopk.unpatch(model)
    for block in model.modules():
        if type(block).__name__ == "OlmoeSparseMoeBlock":
            block.experts.__dict__.pop("forward", None)
            if variant == "stock_rows":
                block.experts.forward = _row_dispatch(block.experts)
    if variant in ("seqtopk", "padded"):
        seqtopk.patch(model, k=k, cap=k + 2, exact_budget=True)
    if variant == "padded":
        _pad_slots(model)


def _pad_slots(model):
    from seqtopk.engines.hf import require_patch

    for layer in require_patch(model).layers:
        experts = layer.family.experts(layer.block)
        stock = type(experts).forward.__get__(experts)

        def forward(hidden, ids, weights, _layer=layer, _stock=stock):
            _layer.plan = None  # ignore seqtopk's row plan
            unchosen = ids < 0
            return _stock(hidden, torch.where(unchosen, ids[:, :1], ids), weights.masked_fill(unchosen, 0))

        experts.forward = forward


def _row_dispatch(experts):
    from seqtopk.routing.dispatch import plan_pairs
    from seqtopk.engines.hf.experts import run_plan

    original = experts.forward

    def forward(hidden, ids, weights):
        plan = plan_pairs(ids, weights, torch.ones_like(ids, dtype=torch.bool), ids.numel())
        return run_plan(experts, original, hidden, plan)

    return forward


def bench_inputs(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill batch [b, t] and the decode prompts [decode_batch, prompt], drawn the same every run."""
    gen = torch.Generator().manual_seed(0)
    b, t = shape["prefill"]
    prefill_ids = torch.randint(3, shape["vocab_size"], (b, t), generator=gen).to(device)
    prompt = torch.randint(3, shape["vocab_size"], (shape["decode_batch"], shape["prompt"]), generator=gen).to(device)
    return prefill_ids, prompt


def bench_model(model, shape, device, reps):
    k = shape["num_experts_per_tok"]
    b, t = shape["prefill"]
    prefill_ids, prompt = bench_inputs(shape, device)
    db = shape["decode_batch"]
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
                      "ratio_seqtopk_vs_stock_rows": rates["seqtopk"] / rates["stock_rows"],
                      "batch": b if phase == "prefill" else db, "tokens": t if phase == "prefill" else n_new}
    out["assignments"] = measure_assignments(model, k, prefill_ids)
    return out


def measure_assignments(model, k, prefill_ids):
    """(token, expert) rows that actually run through the experts per token, for each variant (prefill)."""
    from seqtopk.engines.hf import experts as hf_dispatch

    blocks = [m for m in model.modules() if type(m).__name__ == "OlmoeSparseMoeBlock"]
    experts_cls = type(blocks[0].experts)
    original_forward, original_grouped = experts_cls.forward, hf_dispatch._grouped
    counted = {"rows": 0}

    def counting_forward(self, hidden, ids, weights, *args, **kwargs):  # stock kernel and filled slots
        counted["rows"] += ids.numel()
        return original_forward(self, hidden, ids, weights, *args, **kwargs)

    def counting_grouped(experts, hidden, plan, *args):  # seqtopk's row plan (and the path it runs on)
        counted["rows"] += plan.token.numel()
        return original_grouped(experts, hidden, plan, *args)

    experts_cls.forward, hf_dispatch._grouped = counting_forward, counting_grouped
    result = {}
    try:
        for variant in VARIANTS:
            set_variant(model, variant, k)  # installed after the counters, so every path is counted
            counted["rows"] = 0
            with torch.no_grad():
                model(prefill_ids, use_cache=False)
            result[variant] = counted["rows"] / (prefill_ids.numel() * len(blocks))
    finally:
        experts_cls.forward, hf_dispatch._grouped = original_forward, original_grouped
        set_variant(model, "stock", k)
    return {"expert_rows_per_token": result, "budget_per_token": k}


def bench_selection(shape, device, reps):
    from seqtopk.routing.rules import capped_candidates, select_causal, select_sequence

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
    bars = [("ratio_seqtopk_vs_stock", "SeqTopK / stock TopK"),
            ("ratio_padded_vs_stock", "SeqTopK padded (baseline) / stock"),
            ("ratio_seqtopk_vs_stock_rows", "SeqTopK / TopK with the same dispatch")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(labels))
    for i, (key, name) in enumerate(bars):
        ax1.bar([x + (i - 1) * 0.27 for x in xs], [result[p][key] for p in labels], width=0.27, label=name)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(0.97, color="r", ls="--", lw=0.8, label="target 0.97")
    ax1.set_xticks(list(xs), labels)
    ax1.set_ylabel("throughput / stock TopK")
    ax1.set_ylim(0, 1.5)
    ax1.legend(loc="lower right", fontsize=8)
    sel = result["selection"]["ms"]
    ax2.bar(list(sel), list(sel.values()), color=["gray", "C0", "C2"])
    ax2.set_ylabel("ms per call")
    ax2.set_title(f"selection step ({result['selection']['tokens']} tokens x {result['selection']['experts']} experts)")
    entropy = result.get("normalised_entropy")
    router = f", {result.get('sharpness', 'near-uniform')} router" + (f" (entropy {entropy:.2f})" if entropy else "")
    k = result["settings"]["k"]
    fig.suptitle(f"SeqTopK k={k} vs stock TopK-{k}, transformers, {result['device_name']} ({result['shape']}{router})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sharpness", default="near-uniform", choices=list(SHARPNESS),
                        help="router sharpness (gate weights redrawn; the normalised entropy is recorded)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default evals/results/hf_bench_<device>[_<shape>][_<sharpness>].json)")
    parser.add_argument("--budget", type=int, default=None,
                        help="experts per token k' for both stock TopK-k' and SeqTopK k=k' (cap k'+2); default the "
                             "shape's top-k. The checkpoint is the same, only the budget changes")
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.budget is not None:
        if not 1 <= args.budget <= shape["num_experts"] - 2:
            parser.error(f"--budget must be between 1 and {shape['num_experts'] - 2} (cap is budget + 2 experts)")
        shape["num_experts_per_tok"] = args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"building {args.shape} model on {args.device} ({device_name})", flush=True)
    model = build_model(shape, args.device)
    sharpen(model, SHARPNESS[args.sharpness])
    import transformers

    result = {"shape": args.shape, "device": args.device, "device_name": device_name,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "experts_implementation": getattr(model.config, "_experts_implementation", None),
              "config": {k: v for k, v in shape.items()}, "reps": args.reps, "threads": torch.get_num_threads(),
              "settings": {"k": shape["num_experts_per_tok"], "cap": shape["num_experts_per_tok"] + 2,
                           "exact_budget": True, "prefill": "sequence", "decode": "expert_cache"},
              "sharpness": args.sharpness, "gate_std": SHARPNESS[args.sharpness]}
    load_before = os.getloadavg()[0]
    result.update(bench_model(model, shape, args.device, args.reps))
    result["normalised_entropy"] = round(model_router_entropy(model, bench_inputs(shape, args.device)[0]), 3)
    result["selection"] = bench_selection(shape, args.device, args.reps)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}  # 1-minute, this host
    device = args.device.split(":")[0]
    suffix = "" if args.shape in ("cpu-small", "olmoe") else f"_{args.shape}"
    suffix += "" if args.sharpness == "near-uniform" else f"_{args.sharpness}"
    suffix += "" if args.budget in (None, SHAPES[args.shape]["num_experts_per_tok"]) else f"_k{args.budget}"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"hf_bench_{device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for phase in ("prefill", "decode"):
        r = result[phase]
        print(f"{phase}: " + ", ".join(f"{v} {r['tokens_per_s'][v]:.1f} tok/s" for v in VARIANTS)
              + f"; seqtopk/stock {r['ratio_seqtopk_vs_stock']:.3f}, padded/stock {r['ratio_padded_vs_stock']:.3f}, "
              f"seqtopk/stock_rows {r['ratio_seqtopk_vs_stock_rows']:.3f}")
    s = result["selection"]
    print(f"selection: topk {s['ms']['topk']:.3f} ms, seqtopk {s['ms']['seqtopk_sequence']:.3f} ms "
          f"(x{s['ratio_sequence_vs_topk']:.2f}), causal {s['ms']['seqtopk_causal']:.3f} ms (x{s['ratio_causal_vs_topk']:.2f})")
    print(f"expert rows per token: {json.dumps(result['assignments'])}")
    print(f"router: {args.sharpness}, normalised entropy {result['normalised_entropy']:.3f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
