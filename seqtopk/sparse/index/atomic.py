"""Write a file or a folder so that readers find the old version or the new one, never half of either.

Everything is written under a hidden temporary name in the destination's own folder (a rename is atomic only
within one file system), flushed to disk with fsync, then renamed into place; the parent folder is fsynced
too, so the rename itself survives a crash. A write that fails removes its temporary and leaves the
destination untouched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def write_file_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        # os.open with 0o666 keeps the umask's permissions (tempfile.mkstemp would make the file owner-only).
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def staging_folder(out: Path) -> Path:
    """An empty hidden folder next to `out` to write a new version of it into (then `replace_folder`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()  # default mode: the umask applies (tempfile.mkdtemp would make it owner-only)
    return staging


def replace_folder(staging: Path, out: Path) -> None:
    """Move a completely written `staging` folder to `out`, replacing an existing `out` only then.

    A folder cannot be renamed over a non-empty one, so an existing `out` is first renamed aside and
    removed once the new one is in place; if moving the new one in fails, the old one is put back. A crash
    between those two renames leaves the old version whole, under .<name>.<id>.old next to `out`.
    """
    staging, out = Path(staging), Path(out)
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for folder in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        fsync_folder(folder)
    fsync_folder(staging)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_folder(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_folder(folder: Path) -> None:
    """Make renames and new entries in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
