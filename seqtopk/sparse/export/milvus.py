"""Sparse codes in Milvus: a SPARSE_FLOAT_VECTOR field with a SPARSE_INVERTED_INDEX, metric IP.

The same client talks to Milvus Lite (a file path such as ./codes.db: the Milvus engine run in-process by
the milvus-lite package, no server to start) and to a Milvus server or cluster (http://host:19530). Search
is exact: the index walks the query's posting lists with DAAT_MAXSCORE, which prunes only documents that
cannot reach the top k, and `drop_ratio_search` (the share of the query's smallest values Milvus may ignore)
is 0 unless asked otherwise. The collection's seqtopk metadata is kept as JSON in its description. Milvus
Lite answers rename and alias calls with UNIMPLEMENTED, so `--overwrite` drops the old collection before
writing the new one (Qdrant switches an alias instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from seqtopk.sparse.export.common import MAX_DOC_ID_LENGTH, CodesInfo, EngineError, Hit, SparseEngine, info_text
from seqtopk.sparse.index.rows import SparseRows


class MilvusEngine(SparseEngine):
    """A collection of sparse codes in Milvus or Milvus Lite (uri: a .db file path or a server URL)."""

    engine = "milvus"
    # Milvus Lite implements neither rename_collection nor aliases, so an export writes under the name itself.
    stages = False

    def __init__(self, uri: str, collection: str, token: str | None = None, drop_ratio_search: float = 0.0) -> None:
        super().__init__(uri, collection)
        if not 0.0 <= drop_ratio_search < 1.0:
            raise EngineError(f"drop_ratio_search must lie in [0, 1), got {drop_ratio_search}")
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise EngineError('Milvus export needs pymilvus: pip install "seqtopk[vector-engines]"') from None
        local = "://" not in uri
        if local and not uri.endswith(".db"):
            raise EngineError(f"a Milvus Lite path must end in .db (got {uri!r}); a server needs http://host:19530")
        if local:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)  # Milvus Lite creates the file, not its folder
        self.drop_ratio_search = drop_ratio_search
        # Milvus Lite's server answers pymilvus' 10 s keep-alive pings on idle channels with GOAWAY
        # ("too_many_pings") and the next call fails; ping rarely, and only during calls. A dedicated channel
        # is never one another client closed.
        options = {"grpc_options": {"grpc.keepalive_time_ms": 600_000, "grpc.keepalive_permit_without_calls": 0}}
        # Milvus Lite starts a server process first; on a loaded 2-core machine that outlasts pymilvus's 10 s.
        self.client = MilvusClient(uri, token=token or "", dedicated=True, timeout=60, **(options if local else {}))

    def read_info(self) -> CodesInfo | None:
        if not self.client.has_collection(self.collection):
            return None
        description = self.client.describe_collection(self.collection).get("description", "")
        try:
            data = json.loads(description)
        except ValueError:
            data = None
        return CodesInfo.from_json(data, self.where)

    def count(self) -> int:
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def close(self) -> None:
        self.client.close()

    def _create(self, name: str, info: CodesInfo) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False, description=info_text(info))
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_DOC_ID_LENGTH)
        schema.add_field("token", DataType.INT32)  # position inside the document: 0 for CSR, token for SSR
        schema.add_field("code", DataType.SPARSE_FLOAT_VECTOR)
        index = self.client.prepare_index_params()
        index.add_index(field_name="code", index_type="SPARSE_INVERTED_INDEX", metric_type="IP",
                        params={"inverted_index_algo": "DAAT_MAXSCORE"})
        # Strong consistency: a search right after an export sees every row.
        self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")

    def _insert(self, name: str, start: int, end: int, codes: SparseRows, doc_ids: list[str],
                tokens: np.ndarray) -> None:
        rows = []
        for i, doc_id, token in zip(range(start, end), doc_ids, tokens.tolist()):
            indices, values = codes.row(i)
            rows.append({"row": i, "doc_id": doc_id, "token": token,
                         "code": dict(zip(indices.tolist(), values.tolist()))})
        self.client.insert(name, rows)

    def _finish(self, name: str, rows: int) -> None:
        self.client.flush(name)
        written = int(self.client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])
        if written != rows:
            raise EngineError(f"Milvus holds {written} of the {rows} rows written to {name!r}; export again")

    def _publish(self, name: str, replace: bool) -> None:
        pass  # written under its own name (stages = False)

    def _drop(self, name: str) -> None:
        if self.client.has_collection(name):
            self.client.drop_collection(name)

    def _search(self, queries: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[list[Hit]]:
        data = [dict(zip(indices.tolist(), values.tolist())) for indices, values in queries]
        found = self.client.search(
            self.collection, data=data, anns_field="code", limit=k, output_fields=["doc_id"],
            search_params={"metric_type": "IP", "params": {"drop_ratio_search": self.drop_ratio_search}},
        )
        return [[Hit(hit["entity"]["doc_id"], float(hit["distance"])) for hit in hits] for hits in found]
