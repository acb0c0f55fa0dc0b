"""Transitional: the corpus reader is seqtopk.sparse.data.readers.read_beir_jsonl. This name stays only until
seqtopk/cli/ssr.py imports that directly; then delete this file."""

from seqtopk.sparse.data.readers import read_beir_jsonl as read_corpus

__all__ = ["read_corpus"]
