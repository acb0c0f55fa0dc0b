"""vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls register() in every process it starts (API server, engine core, workers), so everything here
must be idempotent and cheap, and must change nothing until the user asks for SeqTopK.
"""

from __future__ import annotations

import importlib.util

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    # Each feature owns one module with its own install function; a feature whose module is not part of
    # this build is skipped.
    from seqtopk.engines import vllm_routing  # SeqTopK routing, switched on per server

    vllm_routing.install()
    if importlib.util.find_spec("seqtopk.csr") is not None:
        from seqtopk.csr import vllm_model  # CSR sparse embedding heads served as pooling models

        vllm_model.register_architectures()
