"""`seqtopk demo`: the same prompt continued with stock TopK and with SeqTopK, experts per token shown under the
text, a PNG of experts per token per layer, and held-out figures: does SeqTopK give harder tokens more experts?

By default it runs the small MoE language model shipped in the package (trained by evals/train_demo_model.py
on tinyshakespeare; SeqTopK settings from its card). --model PATH runs your own transformers MoE checkpoint;
--tiny FAMILY a random-weight tiny checkpoint built offline (its text is noise; for tests).
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_PROMPT = "ROMEO:\nWhat news from "
OTHER_PROMPT = "Route experts by sequence, not by token: hard tokens take more experts and easy ones fewer."
BARS = "▁▂▃▄▅▆▇█"


def add_parser(sub) -> None:
    from seqtopk.config import DECODE_RULES, PREFILL_RULES, SeqTopKConfig
    from seqtopk.testing.tiny import FAMILY_CONFIGS

    p = sub.add_parser("demo", help="continue a prompt with TopK and SeqTopK; show experts per token",
                       description=__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="your checkpoint (default: the shipped demo model)")
    source.add_argument("--tiny", default=None, choices=sorted(f for f in FAMILY_CONFIGS if f != "phimoe"),
                        help="a random-weight tiny checkpoint of this family instead")
    p.add_argument("--prompt", default=None, help=f"text to continue (default for the shipped model: {SHIPPED_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (both routings sample with it)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (temperature 0.8)")
    p.add_argument("--held-out", type=Path, default=None,
                   help="text for the held-out figures; its last 10%% is used (default for the shipped model: "
                        "tinyshakespeare under ../shared, else the figures recorded in the model's card)")
    p.add_argument("--png", type=Path, default=Path("seqtopk_demo.png"), help="where to draw (default: %(default)s)")
    p.add_argument("--k", type=float, default=None,
                   help="per-token budget, may be below the model's top_k and fractional (default: the model's "
                        "top_k); a reduced budget is also shown as stock TopK at that k")
    p.add_argument("--cap", type=int, default=None, help="most experts per token (default: the card's, else k + 2)")
    p.add_argument("--min-experts", type=int, default=None, help="default: 1, or 0 when k < 1")
    p.add_argument("--exact-budget", action="store_true", default=None)
    p.add_argument("--prefill", default=None, choices=PREFILL_RULES,
                   help=f"default: the card's, else {SeqTopKConfig.prefill}")
    p.add_argument("--decode", default=None, choices=DECODE_RULES, help=f"default: {SeqTopKConfig.decode}")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    import seqtopk
    from seqtopk import demo
    from seqtopk.routing.rules import describe_rules
    from seqtopk.testing.tiny import cached_checkpoint

    path = args.model or (cached_checkpoint(args.tiny) if args.tiny else demo.MODEL_DIR)
    card = demo.card(path)
    # the card's settings, then the flags given; SeqTopKConfig's defaults for the rest
    given = dict(k=args.k, cap=args.cap, min_experts=args.min_experts, exact_budget=args.exact_budget,
                 prefill=args.prefill, decode=args.decode)
    settings = {**card.get("seqtopk", {}), **{name: value for name, value in given.items() if value is not None}}
    seqtopk.SeqTopKConfig.from_dict(settings)  # validate before loading anything
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.held_out is not None and not args.held_out.is_file():
        raise FileNotFoundError(f"--held-out {args.held_out}: no such file")
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers checkpoint folder (no config.json)")
    hf_logging.disable_progress_bar()
    model, tok = demo.load(path)
    what = card.get("what") or ("random weights, built offline" if args.tiny else "your checkpoint")
    print(f"model: {path}\n       {what}")
    prompt = args.prompt if args.prompt is not None else (SHIPPED_PROMPT if card else OTHER_PROMPT)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    room = getattr(model.config, "max_position_embeddings", None)
    new_tokens = min(args.max_new_tokens, room - ids.shape[1]) if room else args.max_new_tokens
    if new_tokens < 1:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens: no room left in the model's {room}-token context")

    def generate():
        torch.manual_seed(args.seed)
        sampling = {"do_sample": False} if args.greedy else {"do_sample": True, "temperature": 0.8, "top_k": 0}
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id, **sampling)
        return out[0]

    stock_ids = generate()
    with seqtopk.patched(model, **settings):
        cfg = seqtopk.engines.hf.require_patch(model).layers[0].cfg
        routed_ids = generate()
        view = demo.token_view(model, routed_ids)
    top_k = model.config.num_experts_per_tok
    reduced = demo.topk_budgets_around(cfg.k, top_k)
    print(f"SeqTopK: k={cfg.k} cap={cfg.cap} min_experts={cfg.min_experts} exact_budget={cfg.exact_budget}; "
          f"{describe_rules(cfg)}")
    print(f"\n--- stock TopK (every token takes {top_k} experts in every layer)")
    print(_text(tok, stock_ids))
    for k in reduced:  # the honest baseline for a reduced budget: TopK at that budget
        with seqtopk.topk_at(model, k):
            reduced_ids = generate()
        print(f"\n--- stock TopK at k={k} (every token takes {k} expert{'s' * (k > 1)} in every layer; bars on "
              f"the SeqTopK scale below)")
        for line in _bars(tok, reduced_ids, torch.full((len(reduced_ids),), float(k)), cfg.min_experts, cfg.cap):
            print(line)
    per_token = view.experts.float().mean(0)
    print(f"\n--- SeqTopK (under each token: experts it took, mean over layers, {BARS[0]} {cfg.min_experts} "
          f"... {BARS[-1]} {cfg.cap}; mean {float(per_token.mean()):.2f})")
    for line in _bars(tok, routed_ids, per_token, cfg.min_experts, cfg.cap):
        print(line)
    _held_out(args, model, tok, settings, card, path, reduced)
    _draw(tok, view, ids.shape[1], cfg, args.png)
    print(f"\npng: {args.png}")
    return 0


def _piece(tok, token_id: int) -> str:
    text = tok.decode([token_id])
    return text.replace("\n", "⏎").replace("\t", "→") or "·"


def _text(tok, ids) -> str:
    return tok.decode(ids.tolist(), skip_special_tokens=True)


def _bars(tok, ids, per_token, low: int, high: int, width: int = 80) -> list[str]:
    """The text, wrapped at `width` characters, each line followed by a bar per token under its characters."""
    lines, text, bars = [], "", ""
    for token_id, experts in zip(ids.tolist(), per_token.tolist()):
        piece = _piece(tok, token_id)
        level = round((experts - low) / max(high - low, 1) * (len(BARS) - 1))
        bar = BARS[min(max(level, 0), len(BARS) - 1)].ljust(len(piece))
        if text and len(text) + len(piece) > width:
            lines += [text, bars]
            text, bars = "", ""
        text, bars = text + piece, bars + bar
    return lines + [text, bars] if text else lines


def _held_out(args, model, tok, settings: dict, card: dict, path, reduced: tuple[int, ...]) -> None:
    from seqtopk import demo
    from seqtopk.paths import shared_path

    source = args.held_out
    if source is None and card:
        try:
            source = shared_path("data", "tinyshakespeare", "input.txt")
        except FileNotFoundError:
            source = None
    if source is not None and Path(source).is_file():
        figures = demo.held_out_figures(model, settings, demo.held_out_ids(tok, Path(source).read_text()),
                                        reduced=reduced).as_dict()
        where = f"measured now on the last 10% of {source}"
    elif card.get("held_out"):
        figures, where = card["held_out"], f"recorded in {Path(path) / demo.CARD} (held-out text not found here)"
    else:
        print("\nheld-out figures: pass --held-out TEXTFILE to measure them")
        return
    print(f"\nheld-out text ({figures['tokens']} tokens, {where}):")
    print(f"  loss (nats/token): stock TopK {figures['topk_loss']:.4f}, SeqTopK {figures['seqtopk_loss']:.4f} "
          f"at {figures['seqtopk_experts_per_token']:.4f} experts/token")
    for k, loss in figures.get("topk_at_loss", {}).items():
        print(f"  loss (nats/token): stock TopK at k={k}: {loss:.4f} ({loss - figures['topk_loss']:+.4f} against the "
              f"model's top_k; SeqTopK {figures['seqtopk_loss'] - figures['topk_loss']:+.4f})")
    print(f"  experts per token vs token loss: Spearman {figures['spearman_experts_loss']:+.4f}; "
          f"vs router entropy: {figures['spearman_experts_entropy']:+.4f}")
    print("  (Spearman's rho: +1 = more experts exactly where the measure is higher, 0 = unrelated, -1 = the reverse)")


def _draw(tok, view, prompt_len: int, cfg, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = len(view.ids)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.13 * tokens), 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1.2]})
    image = top.imshow(view.experts.float(), aspect="auto", cmap="viridis", vmin=0, vmax=cfg.cap,
                       interpolation="nearest")
    top.set_ylabel("layer")
    top.set_yticks(range(view.experts.shape[0]))
    top.axvline(prompt_len - 0.5, color="white", lw=1)
    top.set_title(f"SeqTopK (k={cfg.k}, cap={cfg.cap}): experts per token per layer; prompt left of the line")
    fig.colorbar(image, ax=top, label="experts", pad=0.01)
    bottom.plot(range(tokens - 1), view.loss.tolist(), label="next-token loss (nats)", color="tab:red")
    bottom.plot(range(tokens), view.entropy.tolist(), label="router entropy (nats)", color="tab:gray")
    bottom.legend(loc="upper right", fontsize=7)
    bottom.set_xticks(range(tokens))
    bottom.set_xticklabels([_piece(tok, t) for t in view.ids.tolist()], fontsize=6)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
