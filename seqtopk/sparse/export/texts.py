"""Texts in, codes out: the JSONL files `seqtopk csr export` and `engine-search` read, and the head that
encodes them (L2-normalised, so an engine's inner product is the head's cosine similarity)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from seqtopk.sparse.export.common import CodesInfo, EngineError
from seqtopk.sparse.index.rows import SparseRows


def read_jsonl_texts(path: Path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a JSONL file of {"_id" or "id", "text", optional "title"} rows (BEIR's corpus and
    queries files); title and text are joined by a space, as MTEB encodes a corpus entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}; give a JSONL file with one {{\"_id\", \"text\"}} object a line")
    ids, texts = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise EngineError(f"{path} line {number} is not JSON ({err})") from None
            doc_id = row.get("_id", row.get("id")) if isinstance(row, dict) else None
            text = f"{row.get('title') or ''} {row.get('text') or ''}".strip() if isinstance(row, dict) else ""
            if doc_id is None or not text:
                raise EngineError(f"{path} line {number} needs an \"_id\" (or \"id\") and a non-empty \"text\"")
            ids.append(str(doc_id))
            texts.append(text)
    if not ids:
        raise EngineError(f"{path} holds no rows")
    return ids, texts


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
