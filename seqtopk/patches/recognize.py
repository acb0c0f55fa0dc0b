"""Recognise an MoE block no table row names, when it is a literal copy of a known family's block and router.

transformers builds many model files from others (modular files), so a new family often routes with the very
code of an old one under new class names. A copy is recognised only when the source of the block's forward and
of its routing call both equal a known family's after class names, comments and blank space are stripped:
anything short of that is not guessed at, and the block is refused with the list of supported families.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from functools import lru_cache

_COMMENT = re.compile(r"#[^\n]*")
_CLASS_NAME = re.compile(r"\b(?!None\b|True\b|False\b)[A-Z][a-z0-9]+[A-Za-z0-9_]*\b")  # CamelCase names
_DOCSTRING = re.compile(r'("""|\'\'\')(?:.|\n)*?\1')


def _normalized(function) -> str | None:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    source = _DOCSTRING.sub("", _COMMENT.sub("", source))
    return " ".join(_CLASS_NAME.sub("C", source).split())


def _fingerprint(block_cls, router_cls, method: str) -> tuple | None:
    parts = (_normalized(block_cls.forward), _normalized(getattr(router_cls, method, None)),
             _normalized(getattr(router_cls, "__init__", None)))
    return None if None in parts else parts


@lru_cache(maxsize=None)
def _known() -> dict:
    """fingerprint -> family, for the patched families whose transformers classes import here."""
    from seqtopk.patches.table import FAMILIES

    known = {}
    for family in FAMILIES:
        if family.unsupported or not family.module:
            continue
        try:
            modeling = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
        except ImportError:
            continue
        block_cls = getattr(modeling, family.block_classes[0], None)
        router_cls = _router_class(modeling, block_cls, family.router_attr)
        if block_cls is None or router_cls is None:
            continue
        fingerprint = _fingerprint(block_cls, router_cls, family.route_method)
        if fingerprint is not None:
            known.setdefault(fingerprint, family)
    return known


def _router_class(modeling, block_cls, router_attr: str):
    if block_cls is None:
        return None
    if not router_attr:
        return block_cls
    found = re.search(rf"self\.{re.escape(router_attr)}\s*=\s*([A-Za-z0-9_]+)\(", inspect.getsource(block_cls.__init__))
    return getattr(modeling, found.group(1), None) if found else None


@lru_cache(maxsize=None)
def _recognize_class(block_cls, router_cls):
    for (block_fp, route_fp, init_fp), family in _known().items():
        method = family.route_method
        if _fingerprint(block_cls, router_cls, method) == (block_fp, route_fp, init_fp):
            return dataclasses.replace(family, name=f"{family.name} (copy: {block_cls.__name__})",
                                       block_classes=(block_cls.__name__,), module="")
    return None


def recognize(block):
    """The known family this block copies exactly (renamed after the block class), or None."""
    from seqtopk.patches.table import FAMILIES

    for router_attr in sorted({f.router_attr for f in FAMILIES if f.unsupported is None}):
        router = getattr(block, router_attr, None) if router_attr else block
        if router is None or not hasattr(block, "experts"):
            continue
        found = _recognize_class(type(block), type(router))
        if found is not None and found.router_attr == router_attr:
            return found
    return None
