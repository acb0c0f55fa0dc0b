"""Sparse vector indexes: row-compressed vectors and an exact inverted index. Engine-free (numpy, numba)."""

from seqtopk.sparse.index.inverted import InvertedIndex
from seqtopk.sparse.index.rows import SparseRows

__all__ = ["InvertedIndex", "SparseRows"]
