"""Sparse codes in Qdrant: a named sparse vector ("code") per point, scored by dot product.

The same client runs Qdrant's local mode (":memory:" or a folder path: pure Python, no server, a reference
implementation for tests and small collections) and a Qdrant server or cluster (http://host:6333). Sparse
search in Qdrant is exact (no approximation to configure). The name a user gives is an alias of a physical
collection, so an export fills a new collection and switches the alias in one step: searches see the old
collection or the new one, never half of it. The seqtopk metadata is the collection's own metadata.
Qdrant's multivectors (MaxSim) take dense vectors only, so SSR's token codes go in as one point per token
(the doc_id and token fields of the payload), like Milvus rows.
"""

from __future__ import annotations

import numpy as np

from seqtopk.sparse.export.common import CodesInfo, EngineError, Hit, SparseEngine
from seqtopk.sparse.index.rows import SparseRows

VECTOR = "code"


class QdrantEngine(SparseEngine):
    """A collection of sparse codes in Qdrant (uri: ":memory:", a local folder, or a server URL)."""

    engine = "qdrant"

    def __init__(self, uri: str, collection: str, token: str | None = None) -> None:
        super().__init__(uri, collection)
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise EngineError('Qdrant export needs qdrant-client: pip install "seqtopk[vector-engines]"') from None
        if "://" in uri:
            self.client = QdrantClient(url=uri, api_key=token or None)
        elif uri == ":memory:":
            self.client = QdrantClient(location=":memory:")
        else:
            self.client = QdrantClient(path=uri)

    def _physical(self) -> str | None:
        """The collection the alias points at; None if there is no such alias."""
        for alias in self.client.get_aliases().aliases:
            if alias.alias_name == self.collection:
                return alias.collection_name
        if self.client.collection_exists(self.collection):
            raise EngineError(f"{self.where} is a collection that `seqtopk csr export` or `ssr export` did not write (its exports "
                              "are aliases); export under another name, or delete it yourself if it is not needed")
        return None

    def read_info(self) -> CodesInfo | None:
        physical = self._physical()
        if physical is None:
            return None
        return CodesInfo.from_json(self.client.get_collection(physical).config.metadata, self.where)

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def close(self) -> None:
        self.client.close()

    def _create(self, name: str, info: CodesInfo) -> None:
        from qdrant_client import models

        self.client.create_collection(
            name, vectors_config={}, sparse_vectors_config={VECTOR: models.SparseVectorParams()},
            metadata=info.to_json(),
        )

    def _insert(self, name: str, start: int, end: int, codes: SparseRows, doc_ids: list[str],
                tokens: np.ndarray) -> None:
        from qdrant_client import models

        points = []
        for i, doc_id, token in zip(range(start, end), doc_ids, tokens.tolist()):
            indices, values = codes.row(i)
            vector = models.SparseVector(indices=indices.tolist(), values=values.tolist())
            points.append(models.PointStruct(id=i, vector={VECTOR: vector}, payload={"doc_id": doc_id, "token": token}))
        self.client.upsert(name, points, wait=True)

    def _finish(self, name: str, rows: int) -> None:
        written = int(self.client.count(name, exact=True).count)
        if written != rows:
            raise EngineError(f"Qdrant holds {written} of the {rows} points written to {name!r}; export again")

    def _publish(self, name: str, replace: bool) -> None:
        from qdrant_client import models

        old = self._physical()
        switch = [models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=name,
                                                                              alias_name=self.collection))]
        if old is not None:
            switch.insert(0, models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.collection)))
        self.client.update_collection_aliases(switch)
        if old is not None:
            self.client.delete_collection(old)

    def _drop(self, name: str) -> None:
        if self.client.collection_exists(name):
            self.client.delete_collection(name)

    def _search(self, queries: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[list[Hit]]:
        from qdrant_client import models

        requests = [
            models.QueryRequest(query=models.SparseVector(indices=idx.tolist(), values=val.tolist()), using=VECTOR,
                                limit=k, with_payload=["doc_id"])
            for idx, val in queries
        ]
        found = self.client.query_batch_points(self.collection, requests)
        return [[Hit(p.payload["doc_id"], float(p.score)) for p in response.points] for response in found]
