"""Registers the CSR head and SSR encoder architectures with vLLM (called from the seqtopk vLLM general plugin).

vLLM calls the plugin in every process it starts, so this is idempotent, imports nothing heavy (the model
class is registered by name and imported only when a CSR head is actually served), and adds an
architecture name that no other checkpoint uses, so serving anything else is unchanged.
"""

from __future__ import annotations

ARCHITECTURE = "SeqtopkCSRBertModel"  # written into a saved head's config.json
MODEL_CLASS = "seqtopk.sparse.vllm.csr_bert:CSRBertEmbeddingModel"
SPARSE_IO_PLUGIN = "seqtopk_csr_sparse"  # entry point in vllm.io_processor_plugins: sparse /pooling output
SSR_ARCHITECTURE = "SeqtopkSSRBertModel"  # an SSR encoder folder: per-token sparse codes
SSR_MODEL_CLASS = "seqtopk.sparse.vllm.ssr_bert:SSRBertTokenModel"
SSR_SPARSE_IO_PLUGIN = "seqtopk_ssr_sparse"  # per-token sparse codes from POST /pooling


def register_architectures() -> None:
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for name, model_class in ((ARCHITECTURE, MODEL_CLASS), (SSR_ARCHITECTURE, SSR_MODEL_CLASS)):
        if name not in supported:
            ModelRegistry.register_model(name, model_class)
