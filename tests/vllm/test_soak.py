"""A small run of evals/soak_vllm.py on every change: a real `vllm serve` with SeqTopK on under concurrent
clients (dropped streams, malformed requests, a KV cache small enough to preempt) and hypothesis-generated
bodies, then the same against a served CSR head. The full run (500 requests at 64 concurrent, 1,000 fuzzed
bodies per route) is recorded in evals/results/soak_vllm.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.figures import assert_png
from tests.sparse.fixtures import needs_shared_data, tiny_head

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@needs_shared_data  # the CSR head trains on shared data
def test_small_soak_loses_nothing_and_never_answers_5xx(tmp_path, vllm_root):

    out = tmp_path / "soak.json"
    args = ["--requests", "100", "--concurrency", "16", "--fuzz", "100", "--prefill", "causal", "--kv-blocks", "24",
            "--plateau", "2", "--csr-head", str(tiny_head()), "--out", str(out)]
    result = subprocess.run([sys.executable, str(REPO / "evals" / "soak_vllm.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=1200)
    report = json.loads(out.read_text()) if out.is_file() else None
    assert report is not None, result.stderr[-4000:]
    text, head = report["runs"]["prefill=causal"], report["runs"]["CSR head"]
    for run in (text, head):
        assert all(run["verdict"].values()), (run["verdict"], run["errors"])
        assert sum(run["outcomes"].values()) == 100
        assert all(r["examples"] == 100 for r in run["fuzz"].values())
    assert text["outcomes"]["valid: dropped by the client"] > 0 and text["outcomes"]["malformed: refused 4xx"] > 0
    assert text["preemptions"] > 0  # the KV cache was small enough to preempt
    assert len(text["plateau"]["rss_per_round_mb"]) == 3  # RSS after the soak, then after each plateau round
    assert result.returncode == 0
    assert_png(out.with_suffix(".png"))
