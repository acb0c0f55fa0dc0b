"""`seqtopk demo`: patch a tiny offline MoE checkpoint, generate, and show experts per token per layer."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate with a SeqTopK-patched tiny MoE and print experts per token",
                       description=__doc__)
    p.set_defaults(func=run)


def run(args) -> int:
    raise NotImplementedError("demo is being written")
