"""SSR indexing and search: encode a corpus into token codes, put them on the shared multi-vector index,
save it (one checksummed file, written atomically), load it back for one head only, search with text.

The index records the fingerprint and folder of the head that built it; searching it with another head's
codes would compare unrelated latents, so `SSRIndex.load` refuses a head whose fingerprint differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqtopk.sparse.index.multivector import MultiVectorIndex

# Two-stage search's first stage walks each query token's DEFAULT_PROBE strongest latents; `ssr search --pool`,
# `ssr eval` and the SSR benchmarks all take their default from here.
DEFAULT_PROBE = 8


@dataclass
class SearchHit:
    doc_id: str
    score: float


class SSRIndex:
    """A MultiVectorIndex of one SSR head's token codes, with that head's encoder for text queries."""

    def __init__(self, index: MultiVectorIndex, encoder) -> None:
        self.index, self.encoder = index, encoder

    @classmethod
    def build(cls, folder: Path, doc_ids: list[str], texts: list[str], progress: bool = False, encoder=None
              ) -> tuple["SSRIndex", dict]:
        """Encode and index documents; returns the index and timings (seconds: tokens, codes, index)."""
        from seqtopk.sparse.ssr.encoder import SSREncoder, TokenCodes, check_texts

        check_texts(texts, "document")
        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} ids for {len(texts)} documents")
        encoder = encoder or SSREncoder(folder)
        t0 = time.perf_counter()
        # float16, as cached: the SAE casts each chunk as it reads it, so no float32 copy of the corpus is made
        tokens = encoder.tokens.encode(texts, "document", progress=progress, desc="document tokens", dtype=np.float16)
        t1 = time.perf_counter()
        codes = TokenCodes(encoder.sae.sparse_codes(tokens.vectors, progress=progress), tokens.offsets, tokens.token_ids)
        t2 = time.perf_counter()
        index = MultiVectorIndex(codes.codes, codes.offsets, doc_ids, codes.token_ids,
                                 meta={"head_fingerprint": encoder.fingerprint, "head_dir": str(Path(folder).resolve()),
                                       "k": encoder.sae.k})
        t3 = time.perf_counter()
        timings = {"backbone_tokens_s": t1 - t0, "sae_codes_s": t2 - t1, "inverted_lists_s": t3 - t2,
                   "index_build_s": t3 - t1}
        return cls(index, encoder), timings

    def save(self, path: Path) -> None:
        self.index.save(path)

    @classmethod
    def load(cls, path: Path, folder: Path | None = None) -> "SSRIndex":
        """The index at `path`, with the encoder of `folder` (default: the folder that built it)."""
        from seqtopk.sparse.ssr.encoder import SSREncoder
        from seqtopk.sparse.ssr.folder import head_fingerprint

        index = MultiVectorIndex.load(path)
        built_by = index.meta.get("head_fingerprint")
        folder = Path(folder or index.meta.get("head_dir") or "")
        if not built_by:
            raise ValueError(f"{path} records no SSR head; build it with `seqtopk ssr index`")
        if head_fingerprint(folder) != built_by:
            raise ValueError(f"{path} was built by another SSR head (fingerprint {built_by}) than {folder} "
                             f"({head_fingerprint(folder)}); search it with the head that built it, or rebuild "
                             f"the index with `seqtopk ssr index {folder} --corpus ... --out {path}`")
        return cls(index, SSREncoder(folder))

    def search(self, query: str, k: int = 10, pool: int | None = None, probe: int | None = DEFAULT_PROBE
               ) -> list[SearchHit]:
        """The k best documents by exact MaxSim. With `pool`: two-stage, the pool best by a first walk over each
        query token's `probe` strongest latents (None: all of them), rescored exactly. Without: exhaustive."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the query is empty; give some text to search for")
        docs, scores = self.index.search(self.encoder.encode_query(query), k, pool=pool, probe=probe)
        return [SearchHit(self.index.doc_ids[d], float(s)) for d, s in zip(docs, scores)]
