"""Where seqtopk reads and writes outside the package, in one place.

- the read-only evaluation data: `../shared` beside the repository (or the working directory's parent),
  or $SEQTOPK_SHARED;
- our caches (tiny checkpoints, backbone embeddings, heads): $SEQTOPK_CACHE, default ~/.cache/seqtopk.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def shared_root() -> Path:
    """$SEQTOPK_SHARED if set, else ../shared relative to the working directory, else beside this repo."""
    env = os.environ.get("SEQTOPK_SHARED")
    if env:
        return Path(env)
    for candidate in (Path.cwd().parent / "shared", _REPO.parent / "shared"):
        if candidate.is_dir():
            return candidate
    return _REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under shared/; FileNotFoundError with what to do if it is missing."""
    path = shared_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: seqtopk reads evaluation data from ../shared beside the repository; "
            "put the data there or set SEQTOPK_SHARED to its location"
        )
    return path


def data_dir(name: str) -> Path:
    """One dataset folder under shared/data; raises FileNotFoundError saying how to point at it."""
    return shared_path("data", name)


def default_cache_dir() -> Path:
    """$SEQTOPK_CACHE, default ~/.cache/seqtopk (not created)."""
    return Path(os.environ.get("SEQTOPK_CACHE", Path.home() / ".cache" / "seqtopk")).expanduser()


def cache_dir(*parts: str) -> Path:
    """A folder under the cache directory, created on demand."""
    path = default_cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
