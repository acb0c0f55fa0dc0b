"""A BEIR corpus.jsonl read and checked whole before anything is encoded or written.

Each line is a JSON object with "_id" and a non-empty "text" and/or "title"; the indexed text is title and
text joined by a space (as MTEB encodes BEIR corpora, seqtopk.sparse.data.readers.scifact_document_text).
"""

from __future__ import annotations

import json
from pathlib import Path

from seqtopk.sparse.data.readers import scifact_document_text


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    """(doc ids, texts); ValueError naming the first bad line and what it lacks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file at {path}: give a BEIR corpus.jsonl (one JSON object per line "
                                'with "_id" and "text")')
    ids, texts, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where} is not a JSON object ({err}); fix the line or remove it") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object with \"_id\" and \"text\"")
            doc_id = row.get("_id")
            if doc_id is None or str(doc_id).strip() == "":
                raise ValueError(f'{where} has no "_id"; every document needs an id')
            text = scifact_document_text(row) if all(isinstance(row.get(k) or "", str) for k in ("title", "text")) else ""
            if not text:
                raise ValueError(f'{where} (document {doc_id}) has no "text" or "title"; every document needs some text')
            if str(doc_id) in seen:
                raise ValueError(f'{where} repeats the id {doc_id!r}; ids must be unique')
            seen.add(str(doc_id))
            ids.append(str(doc_id))
            texts.append(text)
    if not ids:
        raise ValueError(f"{path} holds no documents")
    return ids, texts
