"""Per-family adapters for transformers MoE models: where the routing call lives, how it scores and weighs.

Every family is one row of table.py (patched, or refused with the reason). A block class no row names is
still patched when its router and block are literal copies of a known family's (recognize.py);
anything else is refused with the list of supported families. Routing rules never appear here (see
seqtopk.routing.rules).
"""

from __future__ import annotations

from seqtopk.patches._base import Family
from seqtopk.patches.table import FAMILIES

_BY_CLASS = {cls: family for family in FAMILIES for cls in family.block_classes}


def families() -> list[Family]:
    return list(FAMILIES)


def family_for_block(module) -> Family | None:
    """The family whose MoE block class this module is, or whose router shape it copies exactly."""
    family = _BY_CLASS.get(type(module).__name__)
    if family is not None and family.unsupported is None and family.router_attr:
        if not hasattr(module, family.router_attr.split(".")[0]):
            return None  # a layer class that routes only when built with experts (a dense Gemma 4's layers)
    if family is None and hasattr(module, "experts"):
        from seqtopk.patches.recognize import recognize

        family = recognize(module)
    return family


def supported_summary() -> str:
    return ", ".join(f.name for f in FAMILIES if f.unsupported is None)
