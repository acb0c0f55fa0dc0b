"""Registers the CSR head and SSR encoder architectures with vLLM (called from the seqtopk vLLM general plugin).

vLLM calls the plugin in every process it starts, so this is idempotent, imports nothing heavy (the model
class is registered by name and imported only when a CSR head is actually served), and adds an
architecture name that no other checkpoint uses, so serving anything else is unchanged.
"""

from __future__ import annotations

# The architecture names are part of a saved folder's format (seqtopk.sparse.coding.folder_format, where the
# folder writers read them too); the model classes they stand for live here, in the serving layer.
from seqtopk.sparse.coding.folder_format import ARCHITECTURE, SSR_ARCHITECTURE

MODEL_CLASS = "seqtopk.sparse.vllm.csr_bert:CSRBertEmbeddingModel"
SSR_MODEL_CLASS = "seqtopk.sparse.vllm.ssr_bert:SSRBertTokenModel"


def register_architectures() -> None:
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for name, model_class in ((ARCHITECTURE, MODEL_CLASS), (SSR_ARCHITECTURE, SSR_MODEL_CLASS)):
        if name not in supported:
            ModelRegistry.register_model(name, model_class)
