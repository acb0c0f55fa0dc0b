"""Where the read-only evaluation data lives: `../shared` beside the repository, or $SEQTOPK_SHARED."""

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
