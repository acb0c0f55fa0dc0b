"""Which tokens of a text become vectors, and the backbone's token outputs for them (cached on disk).

Queries and documents are tokenised with the backbone's tokenizer, truncated to QUERY_MAX_TOKENS and
DOC_MAX_TOKENS (special tokens included, the authors' 32 / 180), and the kept tokens are the non-special
ones, minus punctuation for documents (as the authors do). The authors also pad queries to 32 with [MASK]
tokens; all-MiniLM-L6-v2 was never trained on [MASK] expansion, so we do not.
`keep_mask` is the single rule: the Python encoder and the vLLM output plugin both call it.

Token outputs are the backbone's last hidden states (sentence-transformers' token_embeddings), L2
normalised per token. They are stored as float16 under $SEQTOPK_CACHE/ssr-tokens/<transformer fingerprint>/
<kind>/, so evaluation reruns do not run the backbone again: each shard is a folder of .npy files (sha1 keys of
its texts, row offsets, vectors, token ids) that is memory-mapped, so opening a large cache reads only the keys
and a text's rows are read when they are used.
"""

from __future__ import annotations

import string
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqtopk.paths import cache_dir
from seqtopk.sparse.backbone import text_key, transformer_fingerprint

QUERY_MAX_TOKENS = 32
DOC_MAX_TOKENS = 180
KINDS = {"query": QUERY_MAX_TOKENS, "document": DOC_MAX_TOKENS}


def max_tokens(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


def punctuation_ids(tokenizer) -> np.ndarray:
    """Ids of vocabulary entries made only of punctuation (word pieces '##.' included)."""
    marks = set(string.punctuation)
    return np.array(sorted(i for tok, i in tokenizer.get_vocab().items()
                           if tok.removeprefix("##") and set(tok.removeprefix("##")) <= marks), dtype=np.int64)


def keep_mask(token_ids: np.ndarray, kind: str, special_ids: np.ndarray, punct_ids: np.ndarray) -> np.ndarray:
    """Which of one text's (truncated) token ids get a vector: no special tokens; no punctuation in documents."""
    max_tokens(kind)
    token_ids = np.asarray(token_ids)
    keep = ~np.isin(token_ids, special_ids)
    if kind == "document":
        keep &= ~np.isin(token_ids, punct_ids)
    return keep


@dataclass
class TokenBatch:
    """Token vectors of several texts, concatenated: text i owns rows offsets[i]:offsets[i+1]."""

    vectors: np.ndarray  # (n_tokens, d), float32, unit rows
    offsets: np.ndarray  # (n_texts + 1,), int64
    token_ids: np.ndarray  # (n_tokens,), int32

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def text(self, i: int) -> np.ndarray:
        return self.vectors[self.offsets[i]:self.offsets[i + 1]]


class TokenEncoder:
    """The backbone's per-token outputs for queries or documents, with the keep rule applied."""

    def __init__(self, backbone: Path, batch_size: int = 32, use_cache: bool = True) -> None:
        from seqtopk.sparse.backbone import load_backbone

        self.path = Path(backbone)
        self.st_model = load_backbone(self.path)
        self.transformer = self.st_model[0].auto_model
        self.tokenizer = self.st_model.tokenizer
        self.special_ids = np.array(self.tokenizer.all_special_ids, dtype=np.int64)
        self.punct_ids = punctuation_ids(self.tokenizer)
        self.batch_size = batch_size
        self.use_cache = use_cache
        self._stores: dict[str, dict[bytes, tuple[np.ndarray, np.ndarray]]] = {}

    @property
    def dim(self) -> int:
        return int(self.transformer.config.hidden_size)

    def tokenize(self, texts: list[str], kind: str):
        return self.tokenizer(texts, truncation=True, max_length=max_tokens(kind), padding=True, return_tensors="pt")

    def forward(self, texts: list[str], kind: str, grad: bool = False):
        """(unit token vectors as a list of tensors, kept token ids per text); with grad for fine-tuning."""
        import torch
        import torch.nn.functional as F

        batch = self.tokenize(texts, kind)
        with torch.set_grad_enabled(grad):
            hidden = self.transformer(**batch).last_hidden_state
        vectors, ids = [], []
        for row, mask in zip(batch["input_ids"].numpy(), batch["attention_mask"].numpy().astype(bool)):
            kept = np.flatnonzero(mask & keep_mask(row, kind, self.special_ids, self.punct_ids))
            vectors.append(kept)
            ids.append(row[kept].astype(np.int32))
        vectors = [F.normalize(hidden[i, torch.from_numpy(kept)].float(), dim=-1) for i, kept in enumerate(vectors)]
        return vectors, ids

    def encode(self, texts: list[str], kind: str, progress: bool = False, desc: str | None = None,
               dtype=np.float32) -> TokenBatch:
        """Unit token vectors of every text (reading and filling the cache); float16 skips the float32 copy."""
        store = self._store(kind)
        keys = [text_key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in store))
        if missing:
            text_of = dict(zip(keys, texts))
            order = sorted(missing, key=lambda k: len(text_of[k]))  # similar lengths share a batch: less padding
            from tqdm.auto import tqdm

            fresh_keys, fresh = [], []
            for start in tqdm(range(0, len(order), self.batch_size), desc=desc or f"{kind} tokens", unit="batch",
                              disable=not progress, total=-(-len(order) // self.batch_size)):
                chunk = order[start:start + self.batch_size]
                vectors, ids = self.forward([text_of[k] for k in chunk], kind)
                for key, v, i in zip(chunk, vectors, ids):
                    # float16 is what the cache keeps; without a cache keep full precision (vLLM parity)
                    store[key] = (v.numpy().astype(np.float16 if self.use_cache else np.float32), i)
                fresh_keys += chunk
                fresh += [store[k] for k in chunk]
                if self.use_cache and len(fresh_keys) >= 512:
                    self._write_shard(kind, fresh_keys, fresh)
                    fresh_keys, fresh = [], []
            if self.use_cache and fresh_keys:
                self._write_shard(kind, fresh_keys, fresh)
        parts = [store[k] for k in keys]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(ids) for _, ids in parts], out=offsets[1:])
        vectors = np.empty((offsets[-1], self.dim), dtype=dtype)
        ids = np.empty(offsets[-1], dtype=np.int32)
        for (v, i), a, b in zip(parts, offsets[:-1], offsets[1:]):  # one copy (and cast) per text
            vectors[a:b] = v
            ids[a:b] = i
        return TokenBatch(vectors, offsets, ids)

    # --- cache -----------------------------------------------------------------------------------------

    def _folder(self, kind: str) -> Path:
        return cache_dir("ssr-tokens", transformer_fingerprint(self.path), f"{kind}-{max_tokens(kind)}")

    def _store(self, kind: str) -> dict:
        """sha1 key -> (vectors, token ids) of each cached text: views of memory-mapped shards."""
        if kind in self._stores:
            return self._stores[kind]
        store: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        if self.use_cache:
            for shard in sorted(p for p in self._folder(kind).glob("shard-*") if p.is_dir() and p.suffix != ".partial"):
                keys, offsets = np.load(shard / "keys.npy"), np.load(shard / "offsets.npy")
                vectors = np.load(shard / "vectors.npy", mmap_mode="r")
                ids = np.load(shard / "token_ids.npy", mmap_mode="r")
                for key, a, b in zip(keys, offsets[:-1], offsets[1:]):
                    store[key.tobytes()] = (vectors[a:b], ids[a:b])
        self._stores[kind] = store
        return store

    def _write_shard(self, kind: str, keys: list[bytes], parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(i) for _, i in parts], out=offsets[1:])
        final = self._folder(kind) / f"shard-{uuid.uuid4().hex}"
        partial = final.with_suffix(".partial")  # renamed when whole: readers never see half a shard
        partial.mkdir()
        np.save(partial / "keys.npy", np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 20))
        np.save(partial / "offsets.npy", offsets)
        np.save(partial / "vectors.npy", np.concatenate([v for v, _ in parts]).astype(np.float16))
        np.save(partial / "token_ids.npy", np.concatenate([i for _, i in parts]).astype(np.int32))
        partial.rename(final)
