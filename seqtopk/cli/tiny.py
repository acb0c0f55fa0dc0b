"""`seqtopk tiny`: write a tiny random-weight MoE checkpoint (offline) for trying things out."""

from __future__ import annotations


def add_parser(sub) -> None:
    from seqtopk.testing.tiny import FAMILY_CONFIGS

    p = sub.add_parser("tiny", help="write a tiny random-weight MoE checkpoint with an offline tokenizer",
                       description=__doc__)
    p.add_argument("--family", default="qwen3_moe", choices=sorted(FAMILY_CONFIGS))
    p.add_argument("--out", required=True, help="directory to write (config, safetensors, tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from seqtopk.testing.tiny import build_checkpoint

    path = build_checkpoint(args.family, args.out, seed=args.seed)
    print(path)
    return 0
