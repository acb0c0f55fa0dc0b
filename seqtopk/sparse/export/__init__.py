"""Sparse codes exported to distributed vector engines (Milvus, Qdrant), one adapter module per engine.

`open_engine("milvus", "./codes.db", "scifact")` opens Milvus Lite in-process; a URL (http://host:19530,
http://host:6333) reaches a server or cluster with the same calls.
"""

from __future__ import annotations

from seqtopk.sparse.export.common import CodesInfo, EngineError, Hit, SparseEngine

ENGINES = ("milvus", "qdrant")


def open_engine(engine: str, uri: str, collection: str, token: str | None = None, **options) -> SparseEngine:
    """A collection in `engine` at `uri` (nothing is created until `write`)."""
    if engine == "milvus":
        from seqtopk.sparse.export.milvus import MilvusEngine

        return MilvusEngine(uri, collection, token=token, **options)
    if engine == "qdrant":
        from seqtopk.sparse.export.qdrant import QdrantEngine

        return QdrantEngine(uri, collection, token=token, **options)
    raise EngineError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "CodesInfo", "EngineError", "Hit", "SparseEngine", "open_engine"]
