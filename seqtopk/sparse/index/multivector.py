"""Multi-vector documents on the shared inverted index: SSR's aggregation, exact MaxSim.

A document is a run of token rows, each a sparse code; the posting lists are the shared InvertedIndex's,
built over token rows instead of documents (CSR's aggregation sums a list's entries per document; this one
takes, per query token, the max over a document's tokens of the full sparse dot product, then sums over
query tokens):

    s(q, d) = sum_i max_j <q_i, d_j>,   <q_i, d_j> = sum over the latents they share of q_i[l] * d_j[l]

Exact from the index: per query token, walk its latents' lists accumulating acc[row] += q_i[l] * value
(the whole dot product of every token row sharing a latent), then max per document. A document whose
tokens the walk did not all reach also has a token at dot product 0, so its max is at least 0 (this keeps
MaxSim exact for codes of any sign; SSR codes are non-negative, where it changes nothing).

Two-stage search: stage 1 runs the same walk on each query token's `probe` strongest latents only (a lower
bound of every score) and keeps the `pool` best documents; stage 2 scores those exactly from the forward
copy of the token codes, which the index also keeps (it is what an exporter reads, see `token_codes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from seqtopk.sparse.index.inverted import InvertedIndex
from seqtopk.sparse.index.rows import SparseRows
from seqtopk.sparse.index.storage import IndexFileError, load_file, save_arrays

FORMAT = "seqtopk-multivector-index"
DTYPES = {
    "indptr": "<i8", "doc_ids": "<u4", "values": "<f4",  # posting lists (doc_ids: token row ids here)
    "row_indptr": "<i8", "row_indices": "<i4", "row_values": "<f4",  # forward token codes
    "doc_offsets": "<i8", "token_ids": "<i4",  # document d owns rows doc_offsets[d]:doc_offsets[d+1]
}


@dataclass
class TokenCode:
    """One indexed token: its document, its position among the document's indexed tokens, its code."""

    doc_id: str
    position: int
    token_id: int
    latent_ids: np.ndarray
    values: np.ndarray


class MultiVectorIndex:
    """Exact MaxSim search over documents made of sparse token codes, on plain inverted lists.

    `tokens` holds every document's token codes, document after document; `doc_offsets` says where each
    document's rows start. `doc_ids` are the documents' external ids (default "0", "1", ...), `token_ids`
    the backbone's vocabulary ids of the rows (kept for export), `meta` free JSON saved with the index
    (SSR records the head's fingerprint there). Not thread-safe: one search at a time per index.
    """

    def __init__(self, tokens: SparseRows, doc_offsets: np.ndarray, doc_ids: list[str] | None = None,
                 token_ids: np.ndarray | None = None, meta: dict | None = None, use_numba: bool = True) -> None:
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        if doc_offsets[0] != 0 or doc_offsets[-1] != tokens.n_rows or np.any(np.diff(doc_offsets) < 0):
            raise ValueError(f"doc_offsets must rise from 0 to the number of token rows ({tokens.n_rows})")
        postings = InvertedIndex(tokens, use_numba=False)
        self._set(postings, tokens, doc_offsets, doc_ids, token_ids, meta or {}, use_numba)

    def _set(self, postings, tokens, doc_offsets, doc_ids, token_ids, meta, use_numba) -> None:
        self.postings, self.tokens, self.doc_offsets, self.meta = postings, tokens, doc_offsets, meta
        n_docs = len(doc_offsets) - 1
        self.doc_ids = [str(i) for i in range(n_docs)] if doc_ids is None else [str(i) for i in doc_ids]
        if len(self.doc_ids) != n_docs:
            raise ValueError(f"{len(self.doc_ids)} doc ids for {n_docs} documents")
        self.token_ids = np.full(tokens.n_rows, -1, np.int32) if token_ids is None else np.asarray(token_ids, np.int32)
        self.row_doc = np.repeat(np.arange(n_docs, dtype=np.int32), np.diff(doc_offsets))
        self.doc_lengths = np.diff(doc_offsets).astype(np.int64)
        self._kernels = _compiled() if use_numba else None
        self._scratch = None

    # --- sizes ----------------------------------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return self.tokens.n_rows

    @property
    def dim(self) -> int:
        return self.tokens.dim

    @property
    def nbytes(self) -> int:
        """Posting lists + forward codes + document offsets (the token ids kept for export excluded)."""
        return (self.postings.nbytes + self.tokens.indptr.nbytes + self.tokens.indices.nbytes
                + self.tokens.values.nbytes + self.doc_offsets.nbytes)

    # --- scoring --------------------------------------------------------------------------------------

    def _check_query(self, query: SparseRows) -> None:
        if not isinstance(query, SparseRows):
            raise TypeError("a query is SparseRows: one sparse code per query token")
        if query.n_rows == 0:
            raise ValueError("the query has no tokens; give it some text")
        if query.dim != self.dim:
            raise ValueError(f"the query codes have {query.dim} latents and the index {self.dim}: they come "
                             "from different heads")
        if len(query.indices) and (query.indices.min() < 0 or query.indices.max() >= self.dim):
            raise ValueError(f"query latent ids must lie in [0, {self.dim})")

    def maxsim(self, query: SparseRows) -> np.ndarray:
        """Exact MaxSim of the query against every document, walking the posting lists (n_docs,)."""
        self._check_query(query)
        return self._walk(query)

    def _walk(self, query: SparseRows) -> np.ndarray:
        p = self.postings
        if self._kernels is not None:
            if self._scratch is None:
                self._scratch = (np.zeros(self.n_tokens, np.float64), np.zeros(self.n_tokens, np.uint8),
                                 np.empty(self.n_tokens, np.int64), np.full(self.n_docs, -np.inf),
                                 np.zeros(self.n_docs, np.int64), np.empty(self.n_docs, np.int64))
            scores = np.zeros(self.n_docs, np.float64)
            self._kernels[0](p.indptr, p.doc_ids, p.values, self.row_doc, self.doc_lengths, query.indptr,
                             query.indices, query.values.astype(np.float64), scores, *self._scratch)
            return scores
        scores = np.zeros(self.n_docs, np.float64)
        for i in range(query.n_rows):
            latents, weights = query.row(i)
            spans = [(p.indptr[l], p.indptr[l + 1]) for l in latents]
            rows = np.concatenate([p.doc_ids[a:b] for a, b in spans]).astype(np.int64)
            products = np.concatenate([p.values[a:b].astype(np.float64) * w for (a, b), w in zip(spans, weights)])
            touched, inverse = np.unique(rows, return_inverse=True)
            dots = np.bincount(inverse, weights=products)
            docs = self.row_doc[touched]
            best = np.full(self.n_docs, -np.inf)
            np.maximum.at(best, docs, dots)
            reached = np.bincount(docs, minlength=self.n_docs)
            hit = reached > 0
            best[hit & (reached < self.doc_lengths)] = np.maximum(best[hit & (reached < self.doc_lengths)], 0.0)
            scores[hit] += best[hit]
        return scores

    def rescore(self, query: SparseRows, docs: np.ndarray) -> np.ndarray:
        """Exact MaxSim of the query against the given documents, from the forward token codes."""
        self._check_query(query)
        docs = np.asarray(docs, dtype=np.int64)
        dense = query.to_dense().T.astype(np.float64).copy()  # (dim, n_query_tokens): one latent, all tokens
        if self._kernels is not None:
            return self._kernels[1](self.tokens.indptr, self.tokens.indices, self.tokens.values, self.doc_offsets,
                                    docs, dense)
        out = np.zeros(len(docs))
        for n, d in enumerate(docs):
            a, b = self.tokens.indptr[self.doc_offsets[d]], self.tokens.indptr[self.doc_offsets[d + 1]]
            rows = SparseRows(self.tokens.indptr[self.doc_offsets[d]:self.doc_offsets[d + 1] + 1] - a,
                              self.tokens.indices[a:b], self.tokens.values[a:b], self.dim)
            dots = rows.to_dense().astype(np.float64) @ dense if rows.n_rows else np.zeros((1, dense.shape[1]))
            out[n] = dots.max(axis=0).sum()
        return out

    def search(self, query: SparseRows, k: int = 10, pool: int | None = None, probe: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(document numbers, exact MaxSim scores) of the k best documents, best first (ties: lower number).

        Without `pool`: exhaustive, every document sharing a latent with the query is scored exactly.
        With `pool`: two-stage, the `pool` best documents of a walk over each query token's `probe`
        strongest latents (default: all its latents) are rescored exactly.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self._check_query(query)
        if pool is None:
            scores = self._walk(query)
            return _top(np.flatnonzero(scores != 0), scores, k)
        if pool < k:
            raise ValueError(f"pool ({pool}) must be at least k ({k})")
        candidates = self.candidates(query, pool, probe)
        exact = self.rescore(query, candidates)
        order = np.lexsort((candidates, -exact))[:k]
        return candidates[order], exact[order]

    def candidates(self, query: SparseRows, pool: int, probe: int | None = None) -> np.ndarray:
        """Stage 1: the `pool` best documents by MaxSim over each query token's `probe` strongest latents."""
        pruned = query if probe is None else strongest_latents(query, probe)
        scores = self._walk(pruned)
        return _top(np.flatnonzero(scores != 0), scores, pool)[0]

    # --- export ---------------------------------------------------------------------------------------

    def token_codes(self, docs: list[int] | None = None) -> Iterator[TokenCode]:
        """Every indexed token's code, document by document (or only `docs`, by document number)."""
        for d in range(self.n_docs) if docs is None else docs:
            for position, row in enumerate(range(self.doc_offsets[d], self.doc_offsets[d + 1])):
                latents, values = self.tokens.row(row)
                yield TokenCode(self.doc_ids[d], position, int(self.token_ids[row]), latents, values)

    # --- file -----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """One checksummed file, written atomically (an interrupted save leaves an earlier file whole)."""
        arrays = {"indptr": self.postings.indptr, "doc_ids": self.postings.doc_ids, "values": self.postings.values,
                  "row_indptr": self.tokens.indptr, "row_indices": self.tokens.indices,
                  "row_values": self.tokens.values, "doc_offsets": self.doc_offsets, "token_ids": self.token_ids}
        save_arrays(Path(path), arrays, self.n_docs, self.dim, dtypes=DTYPES, fmt=FORMAT,
                    extra={"doc_ids": self.doc_ids, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path, use_numba: bool = True) -> "MultiVectorIndex":
        """An index saved by `save`; a truncated, corrupted or foreign file raises IndexFileError (a ValueError)."""
        path = Path(path)
        arrays, header = load_file(path, DTYPES, FORMAT, n_rows_key="row_indptr")
        n_docs, dim = int(header["n_docs"]), int(header["dim"])
        doc_offsets, row_indptr, row_indices = arrays["doc_offsets"], arrays["row_indptr"], arrays["row_indices"]
        n_rows = len(row_indptr) - 1
        checks = [
            (len(doc_offsets) == n_docs + 1 and doc_offsets[0] == 0 and doc_offsets[-1] == n_rows
             and not np.any(np.diff(doc_offsets) < 0), "its document offsets do not cover the token rows"),
            (row_indptr[0] == 0 and row_indptr[-1] == len(row_indices) == len(arrays["row_values"])
             and not np.any(np.diff(row_indptr) < 0), "its forward token codes are inconsistent"),
            (not len(row_indices) or (row_indices.min() >= 0 and row_indices.max() < dim),
             "its token codes hold latent ids outside its dimension"),
            (len(arrays["token_ids"]) == n_rows, "its token ids do not match its token rows"),
            (isinstance(header.get("doc_ids"), list) and len(header["doc_ids"]) == n_docs,
             "its document ids do not match its documents"),
        ]
        for ok, why in checks:
            if not ok:
                raise IndexFileError(f"{path} cannot be loaded as a multi-vector index: {why}; rebuild it from "
                                     "the documents and save it again")
        tokens = SparseRows(row_indptr, row_indices, arrays["row_values"], dim)
        postings = InvertedIndex.__new__(InvertedIndex)
        postings._set(arrays["indptr"], arrays["doc_ids"], arrays["values"], n_rows, False)
        index = cls.__new__(cls)
        index._set(postings, tokens, doc_offsets, header["doc_ids"], arrays["token_ids"], header.get("meta") or {},
                   use_numba)
        return index


def strongest_latents(query: SparseRows, probe: int) -> SparseRows:
    """Each query token's `probe` largest entries (by value), latent ids kept ascending."""
    if probe < 1:
        raise ValueError(f"probe must be at least 1, got {probe}")
    keep = []
    for i in range(query.n_rows):
        a, b = query.indptr[i], query.indptr[i + 1]
        top = a + np.argsort(-query.values[a:b], kind="stable")[:probe]
        keep.append(np.sort(top))
    keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    counts = [min(probe, int(n)) for n in np.diff(query.indptr)]
    indptr = np.zeros(query.n_rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return SparseRows(indptr, query.indices[keep], query.values[keep], query.dim)


def _top(candidates: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(candidates) > k:
        candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
    top = candidates[np.lexsort((candidates, -scores[candidates]))]
    return top.astype(np.int64), scores[top]


_KERNELS = None


def _compiled():
    """(exact walk, forward rescoring), numba-compiled once per process; None without numba."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    try:
        from numba import njit
    except ImportError:
        return None

    @njit(nogil=True)
    def walk(indptr, rows_of, values, row_doc, doc_len, q_indptr, q_idx, q_val, scores,
             acc, marked, touched, best, reached, docs):
        for i in range(q_indptr.shape[0] - 1):
            n_rows = 0
            for p in range(q_indptr[i], q_indptr[i + 1]):
                w = q_val[p]
                latent = q_idx[p]
                for e in range(indptr[latent], indptr[latent + 1]):
                    r = rows_of[e]
                    if marked[r] == 0:
                        marked[r] = 1
                        touched[n_rows] = r
                        n_rows += 1
                    acc[r] += w * values[e]
            n_docs = 0
            for t in range(n_rows):  # per document: the max over the rows the walk reached
                r = touched[t]
                d = row_doc[r]
                if reached[d] == 0:
                    docs[n_docs] = d
                    n_docs += 1
                    best[d] = acc[r]
                elif acc[r] > best[d]:
                    best[d] = acc[r]
                reached[d] += 1
                acc[r] = 0.0
                marked[r] = 0
            for t in range(n_docs):
                d = docs[t]
                s = best[d]
                if reached[d] < doc_len[d] and s < 0.0:  # an unreached token scores 0
                    s = 0.0
                scores[d] += s
                best[d] = -np.inf
                reached[d] = 0

    @njit(nogil=True)
    def rescore(row_indptr, row_indices, row_values, doc_offsets, docs, dense_t):
        n_q = dense_t.shape[1]
        out = np.zeros(docs.shape[0])
        dots = np.empty(n_q)
        best = np.empty(n_q)
        for n in range(docs.shape[0]):
            d = docs[n]
            a, b = doc_offsets[d], doc_offsets[d + 1]
            if a == b:
                continue
            best[:] = -np.inf
            for r in range(a, b):
                dots[:] = 0.0
                for e in range(row_indptr[r], row_indptr[r + 1]):
                    v = row_values[e]
                    col = dense_t[row_indices[e]]
                    for i in range(n_q):
                        dots[i] += v * col[i]
                for i in range(n_q):
                    if dots[i] > best[i]:
                        best[i] = dots[i]
            out[n] = best.sum()
        return out

    _KERNELS = (walk, rescore)
    return _KERNELS
