"""What every engine export shares: the checks made before an engine is touched, the collection's metadata,
the staged write (a new collection is filled, then published under the name), and search results.

A collection holds one row per sparse vector: an int64 row number, the vector, the id of the document that
owns it and its position inside that document. A CSR code is one row per document (position 0). SSR's token
codes are many rows per document (`offsets`, as in seqtopk.sparse.ssr.encoder.TokenCodes) and are written
the same way; their MaxSim search (per query token, max over a document's rows, summed) is what an SSR search
on an engine would add on top of `search_rows`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from seqtopk.sparse.index.rows import SparseRows

FORMAT = "seqtopk-sparse-codes"
VERSION = 1
MAX_DOC_ID_LENGTH = 512  # Milvus needs a VARCHAR bound; ids longer than this are refused before writing


class EngineError(ValueError):
    """A collection that cannot be written or searched as asked; the message says what to do instead."""


class Hit(NamedTuple):
    doc_id: str
    score: float


@dataclass
class CodesInfo:
    """Metadata kept with a collection, so a search can check its queries come from the same head."""

    dim: int
    head: str  # the head folder's name
    k: int  # active latents per vector
    vectors_per_doc: str = "one"  # "one" (CSR) or "many" (SSR token codes)
    normalized: bool = True  # L2-normalised: the engine's inner product is the head's cosine

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "dim": self.dim, "head": self.head, "k": self.k,
                "vectors_per_doc": self.vectors_per_doc, "normalized": self.normalized}

    @classmethod
    def from_json(cls, data, where: str) -> "CodesInfo":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EngineError(f"{where} was not written by `seqtopk csr export` or `ssr export` (no seqtopk metadata); "
                              "export into another collection name, or drop it yourself if it is not needed")
        if data.get("version") != VERSION:
            raise EngineError(f"{where} has seqtopk export format version {data.get('version')!r}; this seqtopk "
                              f"reads version {VERSION}: export it again with this version")
        return cls(int(data["dim"]), str(data["head"]), int(data["k"]), str(data["vectors_per_doc"]),
                   bool(data["normalized"]))


def check_codes(codes: SparseRows, doc_ids: list[str], offsets: np.ndarray | None = None) -> np.ndarray:
    """Refuse codes an engine would reject halfway (or accept wrongly); return each row's document index."""
    n_docs = len(doc_ids)
    offsets = np.arange(n_docs + 1) if offsets is None else np.asarray(offsets, dtype=np.int64)
    if len(offsets) != n_docs + 1 or offsets[0] != 0 or offsets[-1] != codes.n_rows or np.any(np.diff(offsets) < 0):
        raise EngineError(f"{n_docs} document ids do not match {codes.n_rows} code rows (offsets must run from 0 "
                          f"to the number of rows, ascending)")
    if n_docs == 0:
        raise EngineError("no documents to export; give at least one")
    seen = set()
    for doc_id in doc_ids:
        if not isinstance(doc_id, str) or not doc_id or len(doc_id) > MAX_DOC_ID_LENGTH:
            raise EngineError(f"document id {doc_id!r} must be a non-empty string of at most {MAX_DOC_ID_LENGTH} "
                              "characters")
        if doc_id in seen:
            raise EngineError(f"document id {doc_id!r} appears twice; ids must be unique")
        seen.add(doc_id)
    if len(codes.indices) and (codes.indices.min() < 0 or codes.indices.max() >= codes.dim):
        raise EngineError(f"latent ids must lie in [0, {codes.dim})")
    if not np.all(np.isfinite(codes.values)):
        raise EngineError("codes hold NaN or infinite values; check the head and its inputs")
    return np.repeat(np.arange(n_docs), np.diff(offsets))


def staging_name(collection: str) -> str:
    """A fresh collection name to fill, then publish as `collection` (letters, digits, _ only)."""
    return f"{collection}_seqtopk_{uuid.uuid4().hex[:8]}"


def row_batches(codes: SparseRows, batch_size: int, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    """(start, end) row ranges of at most batch_size rows, with a progress bar over rows."""
    with tqdm(total=codes.n_rows, desc=desc, unit="rows", disable=not progress) as bar:
        for start in range(0, codes.n_rows, batch_size):
            end = min(start + batch_size, codes.n_rows)
            yield start, end
            bar.update(end - start)


def check_queries(queries: SparseRows, info: CodesInfo, where: str, k: int) -> None:
    if queries.dim != info.dim:
        raise EngineError(f"queries have {queries.dim} latents and {where} holds codes of {info.dim} (head "
                          f"{info.head!r}): encode queries with the head the collection was exported with")
    if k < 1:
        raise EngineError(f"k must be at least 1, got {k}")


def info_text(info: CodesInfo) -> str:
    return json.dumps(info.to_json())


class SparseEngine:
    """A collection of sparse codes in one engine. Subclasses say how to create, fill, publish, drop and
    search a collection; the order of those steps, and every check made before the first, live here."""

    engine = ""
    stages = True  # fill a staging collection, then publish it under the name

    def __init__(self, uri: str, collection: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,199}", collection or ""):
            raise EngineError(f"collection name {collection!r} must start with a letter or _ and hold only letters, "
                              "digits and _ (at most 200), which every engine accepts")
        self.uri, self.collection = uri, collection
        self._info: CodesInfo | None = None

    @property
    def where(self) -> str:
        return f"{self.engine} collection {self.collection!r} at {self.uri}"

    def write(self, codes: SparseRows, doc_ids: list[str], info: CodesInfo, offsets: np.ndarray | None = None,
              overwrite: bool = False, batch_size: int = 5000, progress: bool = True) -> int:
        """Export codes (row i belongs to document doc_of_row[i]) as the collection; return rows written.

        Everything is checked before the engine is touched. Where the engine can switch a name atomically
        (`stages`), rows go into a new collection published under the name only when complete, so a failed
        export leaves an earlier collection of that name as it was; elsewhere an existing collection is
        dropped first (only with overwrite) and a failed export removes what it wrote.
        """
        self._info = None
        doc_of_row = check_codes(codes, doc_ids, offsets)
        if codes.dim != info.dim:
            raise EngineError(f"codes have {codes.dim} latents but the metadata says {info.dim}")
        existing = self.read_info()
        if existing is not None and not overwrite:
            raise EngineError(f"{self.where} already exists; pass --overwrite to replace it, or choose another name")
        first_row = np.arange(len(doc_ids) + 1) if offsets is None else np.asarray(offsets, dtype=np.int64)
        token_of_row = np.arange(codes.n_rows) - first_row[doc_of_row]  # position inside its document
        staged = staging_name(self.collection) if self.stages else self.collection
        if existing is not None and not self.stages:
            self._drop(self.collection)
        self._create(staged, info)
        try:
            for start, end in row_batches(codes, batch_size, progress, f"{self.engine} export"):
                self._insert(staged, start, end, codes, [doc_ids[d] for d in doc_of_row[start:end]],
                             token_of_row[start:end])
            self._finish(staged, codes.n_rows)
            self._publish(staged, replace=existing is not None)
        except BaseException:
            self._drop(staged)
            raise
        return codes.n_rows

    def info(self) -> CodesInfo:
        """The collection's metadata (read once per engine object), or an EngineError saying how to create it."""
        if self._info is None:
            self._info = self.read_info()
        if self._info is None:
            raise EngineError(f"{self.where} does not exist; create it with `seqtopk csr export` (or `ssr export` for token codes)")
        return self._info

    def search(self, queries: SparseRows, k: int = 10, batch_size: int = 64) -> list[list[Hit]]:
        """The k best documents for each query row, best first."""
        info = self.info()
        check_queries(queries, info, self.where, k)
        results = []
        for start in range(0, queries.n_rows, batch_size):
            rows = range(start, min(start + batch_size, queries.n_rows))
            asked = [i for i in rows if queries.indptr[i + 1] > queries.indptr[i]]  # an empty query matches nothing
            found = dict(zip(asked, self._search([queries.row(i) for i in asked], k))) if asked else {}
            results.extend(found.get(i, []) for i in rows)
        return results

    # What each engine provides.
    def read_info(self) -> CodesInfo | None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _create(self, name: str, info: CodesInfo) -> None:
        raise NotImplementedError

    def _insert(self, name: str, start: int, end: int, codes: SparseRows, doc_ids: list[str],
                tokens: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self, name: str, rows: int) -> None:
        raise NotImplementedError

    def _publish(self, name: str, replace: bool) -> None:
        raise NotImplementedError

    def _drop(self, name: str) -> None:
        raise NotImplementedError

    def _search(self, queries: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[list[Hit]]:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
