"""The SSR encoder: text -> one unit-norm sparse code per kept token (backbone token outputs, then the SAE).

`SSREncoder(folder)` is the Python reference the vLLM-served model must equal. Token vectors come from the
on-disk token cache (seqtopk.sparse.ssr.tokens) unless `use_cache=False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqtopk.sparse.index.rows import SparseRows


@dataclass
class TokenCodes:
    """Sparse codes of several texts' tokens: text i owns rows offsets[i]:offsets[i+1] of `codes`."""

    codes: SparseRows
    offsets: np.ndarray
    token_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def text(self, i: int) -> SparseRows:
        """Text i's token codes as SparseRows of their own."""
        a, b = self.offsets[i], self.offsets[i + 1]
        start, end = self.codes.indptr[a], self.codes.indptr[b]
        return SparseRows(self.codes.indptr[a:b + 1] - start, self.codes.indices[start:end],
                          self.codes.values[start:end], self.codes.dim)


class SSREncoder:
    """Encode queries and documents of an SSR folder into per-token sparse codes."""

    def __init__(self, folder: Path, use_cache: bool = True) -> None:
        from seqtopk.sparse.ssr.folder import check_ssr_folder, head_fingerprint, load_sae
        from seqtopk.sparse.ssr.tokens import TokenEncoder

        self.folder = Path(folder)
        self.config = check_ssr_folder(self.folder)
        self.sae = load_sae(self.folder)
        self.tokens = TokenEncoder(self.folder, use_cache=use_cache)
        self.fingerprint = head_fingerprint(self.folder)

    @property
    def dim(self) -> int:
        return self.sae.hidden_dim

    def encode(self, texts: list[str], kind: str, progress: bool = False) -> TokenCodes:
        """Codes of every kept token of every text (kind: "query" or "document")."""
        check_texts(texts, kind)
        batch = self.tokens.encode(texts, kind, progress=progress)
        return TokenCodes(self.sae.sparse_codes(batch.vectors), batch.offsets, batch.token_ids)

    def encode_query(self, text: str) -> SparseRows:
        codes = self.encode([text], "query")
        if codes.codes.n_rows == 0:
            raise ValueError(f"the query {text!r} has no tokens once special tokens are dropped; give it some words")
        return codes.text(0)


def check_texts(texts: list[str], kind: str) -> None:
    if isinstance(texts, str):
        raise TypeError("pass a list of texts, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{kind} {i} is empty ({text!r}); every {kind} needs some text")
