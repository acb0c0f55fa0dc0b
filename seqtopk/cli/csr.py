"""`seqtopk csr`: train CSR / CSRv2 heads and evaluate them with MTEB on the shared data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class _HelpWithDefaults(argparse.HelpFormatter):
    """Append "(default: X)" unless the help already states its default or there is none to state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


def add_parser(sub) -> None:
    csr = sub.add_parser("csr", help="CSR / CSRv2 sparse embedding heads: train, evaluate", description=__doc__)
    commands = csr.add_subparsers(dest="csr_command", metavar="ACTION", required=True)
    _add_train(commands)
    _add_eval(commands)


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train",
        help="fit a CSR head on a dense backbone; the output folder loads with SparseEncoder(path)",
        description="Fit a CSR (or CSRv2) head on a dense sentence-transformers backbone. The head is trained on "
        "cached backbone embeddings; --finetune-steps adds CSRv2 end-to-end backbone fine-tuning. Data comes from "
        "the train splits under ../shared/data (override the location with $SEQTOPK_SHARED).",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("--backbone", type=Path, default=None, help="sentence-transformers model folder (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--k", type=int, required=True, help="active latents per embedding")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--method", choices=("csr", "csrv2"), default="csr", help="csrv2 adds k annealing and supervised contrastive")
    p.add_argument(
        "--data", action="append", default=None, metavar="NAME|FILE",
        help="training data, repeatable: scifact, stsb, sick, banking77 (train splits) or a JSONL file of "
        '{"anchor","positive"} pairs or {"text","label"} rows (default: the four shared train splits)',
    )
    p.add_argument("--max-steps", type=int, default=2000, help="head training steps on cached embeddings")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per head training step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the head")
    p.add_argument("--hidden-multiple", type=int, default=4, help="hidden size = this x backbone dimension")
    p.add_argument("--k-init", type=int, default=None, help="csrv2: first k of the anneal (default 32 x k, capped at hidden/4)")
    p.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=None,
                   help="supervised contrastive with labels (default: on for csrv2, off for csr)")
    p.add_argument("--finetune-steps", type=int, default=0, help="csrv2: end-to-end backbone fine-tuning steps after the head")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split, batches and initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def _add_eval(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="MTEB scores of saved heads on SciFact, STS-B, SICK-R and Banking77 built from ../shared/data",
        description="Run MTEB (offline) on tasks built from ../shared/data for each head folder and print a JSON "
        "summary with the main scores and the held-out dead-latent fraction recorded at training time.",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("heads", nargs="+", type=Path, metavar="HEAD_DIR")
    p.add_argument("--tasks", default="scifact,stsb,sickr,banking77", help="comma-separated: scifact, stsb, sickr, banking77")
    p.add_argument("--no-cache", action="store_true", help="encode with SparseEncoder.encode instead of cached backbone embeddings")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    p.set_defaults(func=run_eval)


def run_train(args) -> int:
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.csr.train import TrainConfig, train_head

    config = TrainConfig(
        k=args.k, method=args.method, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        hidden_multiple=args.hidden_multiple, k_init=args.k_init, supervised=args.supervised,
        finetune_steps=args.finetune_steps, seed=args.seed, data=args.data or [],
    )
    summary = train_head(args.backbone or default_backbone(), args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    print(
        f"saved {args.out}: {summary['method']} k={summary['k']} hidden={summary['hidden_dim']}, dead latents on "
        f"{summary['heldout_texts']} held-out texts: {summary['dead_latent_fraction_heldout']:.1%}"
    )
    return 0


def run_eval(args) -> int:
    from seqtopk.sparse.csr.evaluate import evaluate_heads

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for head in args.heads:
        if not (head / "modules.json").is_file():
            raise FileNotFoundError(f"{head} is not a saved head folder (no modules.json); train one with `seqtopk csr train`")
    rows = evaluate_heads(args.heads, tasks, use_cache=not args.no_cache)
    text = json.dumps(rows, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
