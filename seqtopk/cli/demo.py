"""`seqtopk demo`: patch a MoE model with SeqTopK, generate, and print experts per token per layer.

By default the model is a tiny random-weight checkpoint built offline (so the text is noise; the routing
is the point). Pass --model to use your own transformers MoE checkpoint.
"""

from __future__ import annotations

DEFAULT_PROMPT = "Route experts by sequence, not by token: hard tokens take more experts and easy ones fewer."


def add_parser(sub) -> None:
    from seqtopk.config import DECODE_RULES, PREFILL_RULES
    from seqtopk.testing.tiny import FAMILY_CONFIGS

    p = sub.add_parser("demo", help="generate with a SeqTopK-patched MoE and print experts per token",
                       description=__doc__)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a tiny offline checkpoint)")
    p.add_argument("--family", default="qwen3_moe", choices=sorted(f for f in FAMILY_CONFIGS if f != "phimoe"),
                   help="family of the tiny default checkpoint")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--k", type=int, default=None, help="per-token budget (default: the model's top_k)")
    p.add_argument("--cap", type=int, default=None, help="most experts per token (default: k + 2)")
    p.add_argument("--min-experts", type=int, default=1)
    p.add_argument("--exact-budget", action="store_true")
    p.add_argument("--prefill", default="sequence", choices=PREFILL_RULES)
    p.add_argument("--decode", default="expert_cache", choices=DECODE_RULES)
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import seqtopk
    from seqtopk.routing.rules import describe_rules
    from seqtopk.testing.tiny import cached_checkpoint

    settings = dict(k=args.k, cap=args.cap, min_experts=args.min_experts, exact_budget=args.exact_budget,
                    prefill=args.prefill, decode=args.decode)
    seqtopk.SeqTopKConfig(**settings)  # validate before building or loading anything
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    hf_logging.disable_progress_bar()
    path = args.model or cached_checkpoint(args.family)
    origin = "your checkpoint" if args.model else f"tiny {args.family} checkpoint (random weights, built offline)"
    print(f"model: {origin} at {path}")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    seqtopk.patch(model, **settings)
    patch = seqtopk.engines.hf.require_patch(model)
    cfg = patch.layers[0].cfg
    print(f"SeqTopK on {len(patch.layers)} MoE layers: k={cfg.k} cap={cfg.cap} min_experts={cfg.min_experts} "
          f"exact_budget={cfg.exact_budget} prefill={cfg.prefill} decode={cfg.decode}")

    enc = tok(args.prompt, return_tensors="pt")
    with torch.no_grad(), seqtopk.trace_routing(model) as trace:
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    tokens = out[0].tolist()
    counts = trace.experts_per_token()[:, 0]  # [layers, tokens]
    prompt_len = enc["input_ids"].shape[1]
    print(f"\nprompt:    {args.prompt!r}")
    print(f"generated: {tok.decode(tokens[prompt_len:], skip_special_tokens=True)!r}")
    print(f"\nexperts per token, per layer ({describe_rules(cfg)})")
    names = [f"L{i}" for i in range(counts.shape[0])]
    print(f"{'pos':>4} {'token':<10} {'phase':<8} " + " ".join(f"{n:>4}" for n in names))
    for pos in range(counts.shape[1]):
        text = repr(tok.decode([tokens[pos]]))[:10]
        phase = "prompt" if pos < prompt_len else "decode"
        print(f"{pos:>4} {text:<10} {phase:<8} " + " ".join(f"{int(c):>4}" for c in counts[:, pos]))
    per_layer = counts.float().mean(dim=1)
    print("\nmean experts/token per layer: " + " ".join(f"{v:.2f}" for v in per_layer.tolist())
          + f"   (stock TopK gives exactly {cfg.k})")
    return 0
