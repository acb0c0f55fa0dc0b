"""Compiled CPU kernels (C++ torch ops), built once per machine and loaded if present.

`build()` compiles seqtopk/kernels/cpu/*.cpp with torch's extension builder (g++ and ninja) into the cache
directory, keyed by the sources and the torch version, so a rebuilt torch or an edited kernel never loads a
stale library. The set-up script runs it (`seqtopk kernels --build`; under CI=true a failed build fails the
set-up). `load()` only loads a library that is already built: engine processes and tests never start a
compiler. Without it every caller keeps the pure-torch path, which makes the same decisions; `status()` and
`missing()` say why. Which path runs is decided in seqtopk.kernels.backend.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
NAME = "seqtopk_cpu"
logger = logging.getLogger("seqtopk")

_state: dict = {}  # "loaded": bool, "reason": str


def _tag() -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    from seqtopk.paths import default_cache_dir

    return default_cache_dir() / "kernels" / f"{NAME}-{_tag()}"


def _library() -> Path:
    return build_dir() / f"{NAME}.so"


def build(verbose: bool = False) -> Path:
    """Compile the CPU kernels (under half a minute on 2 cores), load them, and return the library's path."""
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], build_directory=str(folder),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
    _state.update(loaded=True, reason=f"built and loaded from {_library()}")
    return _library()


def load() -> bool:
    """Load the built kernels once per process; False (and the torch path) when they were not built."""
    if "loaded" not in _state:
        library = _library()
        if not library.exists():
            _state.update(loaded=False, reason=f"not built for this torch and source ({library} missing); "
                                               "run `seqtopk kernels --build`")
        else:
            try:
                torch.ops.load_library(str(library))
                _state.update(loaded=True, reason=f"loaded from {library}")
            except (OSError, RuntimeError) as err:  # e.g. a library built on another CPU
                _state.update(loaded=False, reason=f"could not load {library}: {err}; rebuild with "
                                                   "`seqtopk kernels --build`")
    return _state["loaded"]


def missing() -> str | None:
    """Why the compiled kernels are not in use here (a sentence saying what to run), or None when they are."""
    return None if load() else "compiled CPU kernels not loaded: " + _state["reason"]


def status() -> str:
    load()
    return ("compiled CPU kernels: " + _state["reason"]) if _state["loaded"] else (
        "compiled CPU kernels unavailable, torch path in use: " + _state["reason"])
