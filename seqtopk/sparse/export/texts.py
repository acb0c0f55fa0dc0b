"""Texts in, codes out: the head that encodes the texts `seqtopk csr export` and `engine-search` read
(seqtopk.sparse.data.readers.read_beir_jsonl), L2-normalised so an engine's inner product is the head's
cosine similarity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqtopk.sparse.export.common import CodesInfo
from seqtopk.sparse.index.rows import SparseRows


class HeadEncoder:
    """A saved CSR head (checked before loading) that encodes texts into L2-normalised SparseRows."""

    def __init__(self, folder: Path) -> None:
        from sentence_transformers import SparseEncoder

        from seqtopk.sparse.csr.folder import check_head_folder

        self.folder = check_head_folder(Path(folder))
        self.model = SparseEncoder(str(folder), device="cpu", local_files_only=True)

    @property
    def info(self) -> CodesInfo:
        return CodesInfo(dim=self.folder.hidden_dim, head=self.folder.folder.name, k=self.folder.k)

    def encode(self, texts: list[str], progress: bool = False, chunk: int = 4096) -> SparseRows:
        parts = []
        for start in range(0, len(texts), chunk):  # dense (chunk, hidden) at a time, kept sparse
            dense = self.model.encode(texts[start:start + chunk], batch_size=64, convert_to_tensor=True,
                                      convert_to_sparse_tensor=False, show_progress_bar=progress)
            parts.append(SparseRows.from_dense(dense.float().cpu().numpy()))
        return concat_rows(parts, self.folder.hidden_dim).l2_normalized()


def concat_rows(parts: list[SparseRows], dim: int) -> SparseRows:
    offsets = np.cumsum([0] + [len(p.indices) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64)
    return SparseRows(indptr, np.concatenate([p.indices for p in parts]).astype(np.int32),
                      np.concatenate([p.values for p in parts]).astype(np.float32), dim)
