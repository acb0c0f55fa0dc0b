"""Registers the CSR head architecture with vLLM (called from the seqtopk vLLM general plugin).

vLLM calls the plugin in every process it starts, so this is idempotent, imports nothing heavy (the model
class is registered by name and imported only when a CSR head is actually served), and adds an
architecture name that no other checkpoint uses, so serving anything else is unchanged.
"""

from __future__ import annotations

ARCHITECTURE = "SeqtopkCSRBertModel"  # written into a saved head's config.json
MODEL_CLASS = "seqtopk.sparse.vllm.csr_bert:CSRBertEmbeddingModel"
SPARSE_IO_PLUGIN = "seqtopk_csr_sparse"  # entry point in vllm.io_processor_plugins: sparse /pooling output


def register_architectures() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
