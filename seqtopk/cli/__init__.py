"""The `seqtopk` command. Each subcommand lives in its own module here and registers itself via add_parser()."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide subcommands; each defines add_parser(subparsers) and keeps heavy imports inside its
# handler so that `seqtopk --help` stays fast.
COMMAND_MODULES = (
    "seqtopk.cli.demo",
    "seqtopk.cli.tiny",
    "seqtopk.cli.vllm_cpu_metadata",
    "seqtopk.cli.lm_eval",
    "seqtopk.cli.csr",
    "seqtopk.cli.ssr",
    "seqtopk.cli.kernels",
    "seqtopk.cli.doctor",
)


class _OneLinePerCommand(argparse.HelpFormatter):
    """--help with each subcommand and its help on one line (the longest name is 17 characters)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=110)
        self._action_max_length = 26


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqtopk",
        description="Sequence-level expert routing (SeqTopK) for MoE models, and sparse embedding heads.",
        formatter_class=_OneLinePerCommand,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"seqtopk {args.command}: error: {err}", file=sys.stderr)
        return 2

