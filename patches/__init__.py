"""Per-family adapters for transformers MoE models: where the router lives, how it scores and normalises.

Adding a family = one module here defining FAMILY, listed in FAMILY_MODULES, plus a tiny fixture config
in seqtopk/testing/tiny.py. Routing rules never appear here (see seqtopk.routing.rules).
"""

from __future__ import annotations

import importlib

from seqtopk.patches._base import Family

FAMILY_MODULES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe")


def families() -> list[Family]:
    return [importlib.import_module(f"seqtopk.patches.{name}").FAMILY for name in FAMILY_MODULES]


def family_for_block(module) -> Family | None:
    """The family whose MoE block class this module is, if any."""
    cls = type(module).__name__
    for family in families():
        if cls in family.block_classes:
            return family
    return None


def supported_summary() -> str:
    names = [f.name for f in families() if f.unsupported is None]
    return ", ".join(names)
