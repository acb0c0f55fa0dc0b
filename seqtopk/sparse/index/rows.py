"""Sparse vectors as row-compressed arrays (indptr / indices / values), the form every sparse index takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseRows:
    """Row-compressed sparse vectors: row i is indices/values[indptr[i]:indptr[i+1]], indices ascending."""

    indptr: np.ndarray  # int64, (n + 1,)
    indices: np.ndarray  # int32
    values: np.ndarray  # float32
    dim: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> "SparseRows":
        rows, cols = np.nonzero(dense)
        indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), dense[rows, cols].astype(np.float32), dense.shape[1])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.indptr[i], self.indptr[i + 1]
        return self.indices[start:end], self.values[start:end]

    def l2_normalized(self) -> "SparseRows":
        lengths = np.diff(self.indptr)
        # Sum of squares per row by row number, not np.add.reduceat over indptr: reduceat fails on an empty
        # last row (its start equals len(values)) and gives an empty middle row its neighbour's first value.
        squares = np.bincount(np.repeat(np.arange(self.n_rows), lengths), weights=self.values.astype(np.float64) ** 2,
                              minlength=self.n_rows)
        scale = np.repeat(1.0 / np.maximum(np.sqrt(squares), 1e-12), lengths).astype(np.float32)
        return SparseRows(self.indptr, self.indices, self.values * scale, self.dim)

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n_rows, self.dim), dtype=np.float32)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out
