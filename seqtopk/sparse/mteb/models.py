"""Models under MTEB: a CSR head wrapped explicitly as a sparse model, and the dense baselines.

MTEB only treats a SparseEncoder as sparse when it is wrapped as one (handed over in another wrapper, it is
encoded and scored as a dense model), so `CSRHeadModel` subclasses MTEB's SparseEncoderWrapper: retrieval
receives sparse tensors and every score uses the head's own similarity (cosine, what it was trained with).
With a `CachedBackbone`, backbone embeddings come from the on-disk cache and only the head runs, which
gives the same codes as SparseEncoder.encode (tests/test_csr_mteb.py checks this) at a fraction of the cost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.models.sentence_transformer_wrapper import SparseEncoderWrapper, _is_sparse_compatible_task

from seqtopk.sparse.backbone import CachedBackbone


def batch_texts(inputs) -> list[str]:
    """The texts of an MTEB DataLoader (retrieval corpora arrive with title and text already joined)."""
    return [text for batch in inputs for text in batch["text"]]


def _meta(name: str, dim: int, similarity: ScoringFunction, model_type: str = "dense") -> ModelMeta:
    return ModelMeta.create_empty(
        overwrites={"name": name, "revision": "local", "embed_dim": dim, "similarity_fn_name": similarity, "model_type": [model_type]}
    )


class CSRHeadModel(SparseEncoderWrapper):
    """A saved CSR head folder evaluated as a sparse encoder."""

    def __init__(self, path: Path, backbone: CachedBackbone | None = None, name: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SparseEncoder

        super().__init__(SparseEncoder(str(path), device="cpu", local_files_only=True))
        self.backbone = backbone
        if name:
            self.mteb_model_meta = self.mteb_model_meta.model_copy(update={"name": name, "revision": "local"})
        if self.model.similarity_fn_name != "cosine":
            raise ValueError(f"{path}: head declares similarity {self.model.similarity_fn_name!r}; CSR heads are trained for cosine")
        if any(self.model.prompts.values()):
            self.backbone = None  # the cache stores prompt-free embeddings; let SparseEncoder add prompts

    @property
    def head(self):
        return self.model[-1]

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs: Any):
        if self.backbone is None:
            return super().encode(inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset, prompt_type=prompt_type, **kwargs)
        codes = self.encode_texts(batch_texts(inputs))
        return codes.to_sparse() if _is_sparse_compatible_task(task_metadata) else codes.numpy()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Dense (n, hidden) codes for texts through the cached backbone and the head."""
        dense = torch.from_numpy(self.backbone.encode(texts))
        with torch.inference_mode():
            return self.head({"sentence_embedding": dense})["sentence_embedding"].float()


class DenseBaselineModel(AbsEncoder):
    """The dense backbone, optionally truncated to its first `dims` dimensions (the MRL-style baseline)."""

    def __init__(self, backbone: CachedBackbone, dims: int | None = None, name: str | None = None) -> None:
        self.model = backbone
        self.dims = dims
        full = backbone.model.get_embedding_dimension()
        if dims is not None and not 1 <= dims <= full:
            raise ValueError(f"dims must be between 1 and {full}, got {dims}")
        label = name or f"seqtopk/dense-{dims or full}"
        # Cosine on the kept dimensions: the truncated vector is re-normalised, as an MRL client would.
        self.mteb_model_meta = _meta(label, dims or full, ScoringFunction.COSINE)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs: Any) -> np.ndarray:
        embeddings = self.model.encode(batch_texts(inputs))
        return embeddings[:, : self.dims] if self.dims else embeddings


class LinearHeadModel(DenseBaselineModel):
    """A folder with a trained linear head (the MRL reference): cached backbone embeddings, then the head."""

    def __init__(self, backbone: CachedBackbone, folder: Path, name: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        super().__init__(backbone, name=name)
        self.head = SentenceTransformer(str(folder), device="cpu", local_files_only=True)[-1]
        self.mteb_model_meta = _meta(name or f"seqtopk/{Path(folder).name}", self.head.out_features, ScoringFunction.COSINE)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs: Any) -> np.ndarray:
        dense = torch.from_numpy(self.model.encode(batch_texts(inputs)))
        with torch.inference_mode():
            return self.head({"sentence_embedding": dense})["sentence_embedding"].numpy()


def run_tasks(model, tasks) -> dict[str, float]:
    """Main score per task name, from a real MTEB run (no result cache, no CO2 tracking, offline)."""
    import mteb

    result = mteb.evaluate(model, tasks, cache=None, co2_tracker=False, show_progress_bar=False, overwrite_strategy="always")
    return {r.task_name: float(r.get_score()) for r in result.task_results}
