"""The format of a saved head folder that CSR and SSR folders share, and that the vLLM layer reads.

- the names a folder's config.json gives vLLM: the architecture (`architectures`, registered by
  seqtopk.sparse.vllm.registry) and the sparse-output plugin (`io_processor_plugin`, an entry point of
  `vllm.io_processor_plugins` in pyproject.toml);
- where a saved SparseAutoEncoder keeps its tied weight;
- the error for a head folder whose files are unreadable or disagree.

Plain Python with no imports, so the folder writers, the folder checks and the vLLM plugin (run in every
process vLLM starts) all read it for nothing.
"""

from __future__ import annotations

ARCHITECTURE = "SeqtopkCSRBertModel"  # written into a saved CSR head's config.json
SPARSE_IO_PLUGIN = "seqtopk_csr_sparse"  # entry point in vllm.io_processor_plugins: sparse /pooling output
SSR_ARCHITECTURE = "SeqtopkSSRBertModel"  # an SSR encoder folder: per-token sparse codes
SSR_SPARSE_IO_PLUGIN = "seqtopk_ssr_sparse"  # per-token sparse codes from POST /pooling


class HeadFolderError(ValueError):
    """A head folder with a file that is unreadable or does not match the others."""


def tied_weight_name(names) -> str:
    """Where a saved SparseAutoEncoder keeps its tied weight: safetensors stores the encoder/decoder pair once,
    under either module's name."""
    return "encoder.weight" if "encoder.weight" in names else "decoder.linear.weight"
