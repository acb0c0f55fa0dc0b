"""Sparse vector indexes: row-compressed vectors, an exact inverted index, and its file (storage, atomic)."""

from seqtopk.sparse.index.inverted import InvertedIndex
from seqtopk.sparse.index.rows import SparseRows
from seqtopk.sparse.index.storage import IndexFileError

__all__ = ["IndexFileError", "InvertedIndex", "SparseRows"]
