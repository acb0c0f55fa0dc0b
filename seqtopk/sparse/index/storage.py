"""An inverted index on disk: one file, written atomically, checked whole before any array is used.

Layout: MAGIC, the header's length (uint64, little-endian), a JSON header (format version, n_docs, dim and
each array's name, dtype and length), each array's bytes (starting at a multiple of 8), then the SHA-256 of
everything before it. Loading checks the size and the digest first, so a truncated or corrupted file is
refused before numpy reads it, then the arrays' invariants: the compiled search trusts offsets and doc ids
and would read out of bounds on bad ones.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from seqtopk.sparse.index.atomic import write_file_atomically

MAGIC = b"SQTKIDX\x00"
VERSION = 1
DTYPES = {"indptr": "<i8", "doc_ids": "<u4", "values": "<f4"}  # what InvertedIndex holds, in file order
FORMAT = "seqtopk-inverted-index"
# What each format holds and which class loads it (a file of one kind handed to another gets this fix).
LOADERS = {FORMAT: "InvertedIndex.load (a single-vector index, e.g. CSR)",
           "seqtopk-multivector-index": "MultiVectorIndex.load or `seqtopk ssr search` (a multi-vector SSR index)"}
_DIGEST = 32
_REBUILD = "rebuild it from the documents and save it again"


class IndexFileError(ValueError):
    """An index file that is not a complete index written by seqtopk (truncated, corrupted, or another file)."""


def save_arrays(path: Path, arrays: dict[str, np.ndarray], n_docs: int, dim: int, dtypes: dict = DTYPES,
                fmt: str = FORMAT, extra: dict | None = None) -> None:
    """Write the index arrays to `path` atomically: an interrupted save leaves any previous file as it was.

    `dtypes` and `fmt` describe the kind of index (default: InvertedIndex's); `extra` is JSON kept in the header.
    """
    header = {"format": fmt, "version": VERSION, "n_docs": int(n_docs), "dim": int(dim),
              "arrays": [{"name": name, "dtype": dtype, "length": int(len(arrays[name]))}
                         for name, dtype in dtypes.items()], **(extra or {})}
    encoded = json.dumps(header).encode()

    def write(f):
        digest = hashlib.sha256()

        def put(data) -> None:
            digest.update(data)
            f.write(data)

        put(MAGIC + struct.pack("<Q", len(encoded)) + encoded)
        offset = len(MAGIC) + 8 + len(encoded)
        for name, dtype in dtypes.items():
            put(b"\x00" * (-offset % 8))
            offset += -offset % 8
            data = memoryview(np.ascontiguousarray(arrays[name], dtype=dtype)).cast("B")
            put(data)
            offset += len(data)
        f.write(digest.digest())

    write_file_atomically(Path(path), write)


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], int, int]:
    """(arrays, n_docs, dim) of an index file, or IndexFileError naming the file and what is wrong with it."""
    arrays, header = load_file(path)
    return arrays, int(header["n_docs"]), int(header["dim"])


def load_file(path: Path, dtypes: dict = DTYPES, fmt: str = FORMAT, n_rows_key: str | None = None
              ) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, header) of an index file of format `fmt`, or IndexFileError naming the file and the fault.

    Posting ids must stay below n_docs, or, for indexes whose postings point at rows, below the number of
    rows of the row-offset array `n_rows_key`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}: save one with InvertedIndex.save(path)")
    raw = bytearray(path.stat().st_size)  # writable, so the arrays are too
    with open(path, "rb") as f:
        f.readinto(raw)
    start = len(MAGIC) + 8
    if len(raw) < start + _DIGEST or raw[:len(MAGIC)] != MAGIC:
        raise _bad(path, "it does not start like a seqtopk inverted index (wrong file, or truncated)")
    if hashlib.sha256(memoryview(raw)[:-_DIGEST]).digest() != raw[-_DIGEST:]:
        raise _bad(path, "its checksum does not match: the file is truncated or corrupted")
    (header_length,) = struct.unpack_from("<Q", raw, len(MAGIC))
    try:
        header = json.loads(raw[start:start + header_length])
        if header.get("version") != VERSION:
            raise _bad(path, f"it has format version {header.get('version')!r} and this seqtopk reads version "
                             f"{VERSION}", fix="upgrade seqtopk, or rebuild the index with this one")
        if header.get("format", FORMAT) != fmt:
            raise _bad(path, f"it is a {header.get('format')} file", fix=f"load it with {LOADERS.get(header.get('format'), 'its own loader')}")
        n_docs, dim = int(header["n_docs"]), int(header["dim"])
        specs = {a["name"]: (a["dtype"], int(a["length"])) for a in header["arrays"]}
    except (ValueError, KeyError, TypeError) as err:
        if isinstance(err, IndexFileError):
            raise
        raise _bad(path, f"its header is unreadable ({err})") from None
    if {name: dtype for name, (dtype, _) in specs.items()} != dtypes:
        raise _bad(path, f"its header lists arrays {sorted(specs)} with other types than {dtypes}")
    arrays, offset = {}, start + header_length
    for name, (dtype, length) in specs.items():
        offset += -offset % 8
        size = length * np.dtype(dtype).itemsize
        if length < 0 or offset + size > len(raw) - _DIGEST:
            raise _bad(path, f"array {name} runs past the end of the file")
        arrays[name] = np.frombuffer(raw, dtype=dtype, count=length, offset=offset)
        offset += size
    _check_invariants(path, arrays, len(arrays[n_rows_key]) - 1 if n_rows_key else n_docs, dim)
    return arrays, header


def _check_invariants(path: Path, arrays: dict[str, np.ndarray], n_docs: int, dim: int) -> None:
    indptr, doc_ids, values = arrays["indptr"], arrays["doc_ids"], arrays["values"]
    if n_docs < 0 or len(indptr) != dim + 1 or len(doc_ids) != len(values):
        raise _bad(path, "its array lengths do not fit together")
    if indptr[0] != 0 or indptr[-1] != len(doc_ids) or np.any(np.diff(indptr) < 0):
        raise _bad(path, "its posting-list offsets are not ascending from 0 to the number of entries")
    if len(doc_ids) and int(doc_ids.max()) >= n_docs:
        raise _bad(path, f"it holds doc ids beyond its {n_docs} documents")


def _bad(path: Path, why: str, fix: str = _REBUILD) -> IndexFileError:
    return IndexFileError(f"{path} cannot be loaded as an inverted index: {why}; {fix}")
