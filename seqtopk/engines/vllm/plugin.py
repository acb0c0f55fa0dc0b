"""vLLM general plugin (entry point group `vllm.general_plugins`): installs each seqtopk feature for vLLM.

vLLM calls register() in every process it starts (API server, engine core, workers), so everything here
must be idempotent and cheap, and must change nothing until the user asks for a feature.
"""

from __future__ import annotations

import importlib
import importlib.util

_registered = False

# Each feature owns one module and one install function. A feature whose module is not part of this
# build is skipped.
FEATURES = (
    ("seqtopk.engines.vllm.hooks", "install_engine_hooks"),  # SeqTopK routing, switched on per server
    ("seqtopk.sparse.vllm.registry", "register_architectures"),  # sparse embedding heads as pooling models
)


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    for module, function in FEATURES:
        if importlib.util.find_spec(module) is not None:
            getattr(importlib.import_module(module), function)()
