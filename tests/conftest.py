"""Shared fixtures: tiny offline checkpoints (built once per test session) and the shared data location.

What a test does when the machine lacks something (vLLM, ../shared, a GPU) is decided in one place,
seqtopk.testing.require: skip, or fail under CI=true for what CI must have.
"""

from __future__ import annotations

import os

import pytest

from seqtopk.testing.require import MARKER, apply_markers, require_shared

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


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}(kind, missing): skip when `missing` is a reason, or fail "
                                       "under CI=true for what CI must have (seqtopk.testing.require)")


def pytest_runtest_setup(item):
    apply_markers(item)  # needs(kind, missing) markers: skip, or fail under CI
