"""The format of a saved head folder that CSR and SSR folders share, and that the vLLM layer reads.

- the names a folder's config.json gives vLLM: the architecture (`architectures`, registered by
  seqtopk.sparse.vllm.registry) and the sparse-output plugin (`io_processor_plugin`, an entry point of
  `vllm.io_processor_plugins` in pyproject.toml);
- where a saved SparseAutoEncoder keeps its tied weight;
- the error for a head folder whose files are unreadable or disagree, and how its JSON files are read.

Plain Python with no imports at module level, so the folder writers, the folder checks and the vLLM plugin
(run in every process vLLM starts) all read it for nothing.
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


def read_folder_json(path, fix: str, kind: type = dict):
    """A head folder's JSON file (`path`, a pathlib.Path), or the error that names it and says `fix`: a missing file
    is a FileNotFoundError, an unreadable one or one of another JSON type a HeadFolderError."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise HeadFolderError(f"{path} is not valid JSON, truncated or corrupted ({err}); {fix}") from None
    if not isinstance(value, kind):
        raise HeadFolderError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; {fix}")
    return value
