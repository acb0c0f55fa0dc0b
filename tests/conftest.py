"""Shared fixtures: tiny offline checkpoints (built once per test session), the shared data location and the
compiled kernels.

What a test does when the machine lacks something (vLLM, ../shared, the compiled kernels, a GPU) is decided in
one place, seqtopk.testing.require: skip, or fail under CI=true for what CI must have.
"""

from __future__ import annotations

import os

import pytest

from seqtopk.testing.require import MARKER, apply_markers, require_kernels, require_shared

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_root):
    """tiny_checkpoint(family, **config_overrides) -> directory of a tiny random MoE checkpoint."""
    from seqtopk.testing.tiny import cached_checkpoint

    def get(family: str, **overrides):
        return cached_checkpoint(family, tiny_root, **overrides)

    return get


@pytest.fixture(scope="session")
def load_tiny(tiny_checkpoint):
    """load_tiny(family) -> (fresh fp32 model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(family: str, **overrides):
        path = tiny_checkpoint(family, **overrides)
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    return load


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; when absent, skips the test with a clear message (fails it under CI=true)."""
    return require_shared("data")


@pytest.fixture(scope="session")
def compiled_kernels():
    """The compiled CPU kernels that set-up built (`seqtopk kernels --build`), loaded; when they are not there,
    skips with that command in the message (fails under CI=true). No test builds them: that would move every
    later test of the run from the torch path onto the kernels."""
    require_kernels()


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}(kind, missing): skip when `missing` is a reason, or fail "
                                       "under CI=true for what CI must have (seqtopk.testing.require)")


def pytest_runtest_setup(item):
    apply_markers(item)  # needs(kind, missing) markers: skip, or fail under CI
