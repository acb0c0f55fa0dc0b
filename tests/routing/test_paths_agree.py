"""Every routing path chooses the same: the differential checker (seqtopk.testing.paths_agree) drawn by
hypothesis, bounded for CI (evals/paths_agree.py runs thousands of cases), and the cases it found, as named
regression tests (each failed on 651b752)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqtopk.config import SeqTopKConfig
from seqtopk.kernels import backend, decode_step
from seqtopk.routing.rules import known_pair_count, select_sequence
from seqtopk.testing import paths_agree
from seqtopk.testing.paths_agree import ModelCase, Refused, check_model_case, check_routing_case
from seqtopk.testing.require import needs

ROOT = Path(__file__).resolve().parents[2]
# Families drawn in CI: one of each scoring kind (softmax + renormalised, softmax raw, sigmoid with a selection
# bias under group-limited routing, shared experts); evals/paths_agree.py draws every family.
CI_FAMILIES = ["olmoe", "qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss"]
CI_EXAMPLES = dict(model=60, routing=80, triton=20)


@pytest.fixture(scope="module")
def pool():
    return POOL


@pytest.fixture(scope="module")
def paths(compiled_kernels):
    found = paths_agree.available_paths()
    assert backend.CPU_KERNELS in found, "the compiled kernels are built but not offered"
    return found


def _check(check, *args):
    try:
        return check(*args)
    except Refused as err:
        return f"refused: {err}"


# ------------------------------------------------------------------------------- regression tests


def test_torch_path_fractional_exact_budget_in_a_batch(pool, paths):
    """k=1.5 exact budget, sequence prefill, 2 x 3 batch: the torch path planned B(sum T) = 9 rows for the sum over
    rows of B(T_row) = 10 pairs and raised IndexError (651b752)."""
    case = ModelCase("olmoe", dict(k=1.5, min_experts=1, exact_budget=True, prefill="sequence"), lengths=(3, 3),
                     pad_left=False, chunks=(3,), decode_steps=0)
    assert _check(check_model_case, pool.get("olmoe"), case, paths) is None


@pytest.mark.parametrize("k", [1, 1.5, 0.75])
@pytest.mark.parametrize("prefill", ["sequence", "causal"])
def test_a_forward_that_chooses_no_expert(pool, paths, k, prefill):
    """min_experts=0: a decode step whose one token takes no expert plans zero rows; the torch path's grouped
    experts raised "index is out of bounds for dimension with size 0" (DeepSeek-V3 at k=1.5 and 0.75, OLMoE at
    k=1, 651b752)."""
    for family in ("deepseek_v3", "olmoe"):
        for seed in range(2):
            case = ModelCase(family, dict(k=k, min_experts=0, prefill=prefill), lengths=(3,), pad_left=False,
                             chunks=(3,), decode_steps=10, seed=seed)
            assert _check(check_model_case, pool.get(family), case, paths) is None


def test_known_pair_count_is_what_the_sequence_rule_spends():
    """B(T) is not linear in T for a fractional k: a batch spends the sum of its rows' budgets."""
    cfg = SeqTopKConfig(k=1.5, cap=4, min_experts=1, exact_budget=True).resolve(4, 8)
    values = torch.randn(2, 3, 4).sort(dim=-1, descending=True).values
    spent = int(select_sequence(values, None, cfg.k, cfg.min_experts, True).sum())
    assert known_pair_count("sequence", cfg, 3, rows=2) == spent == 10
    assert known_pair_count("sequence", cfg, 6, rows=None) is None  # packed rows of unknown lengths
    whole = SeqTopKConfig(k=2, cap=4, exact_budget=True).resolve(4, 8)
    assert known_pair_count("sequence", whole, 6, rows=None) == known_pair_count("sequence", whole, 3, rows=2) == 12


# ------------------------------------------------------------------------------- the checker


POOL = paths_agree.ModelPool()  # (module-wide: the strategies read each family's shape from its model)
MODEL_CASES, ROUTING_CASES = paths_agree.strategies(CI_FAMILIES, POOL)
BOUNDED = dict(deadline=None, database=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=CI_EXAMPLES["model"], **BOUNDED)
@given(data=st.data())
def test_paths_agree_on_patched_models(data, pool, paths):
    case = data.draw(MODEL_CASES)
    try:
        found = check_model_case(pool.get(case.family), case, paths)
    except Refused:
        return  # settings the model refuses up front (checked elsewhere): nothing ran
    assert found is None, found


@settings(max_examples=CI_EXAMPLES["routing"], **BOUNDED)
@given(data=st.data())
def test_paths_agree_on_ties_drift_and_long_decodes(data, paths):
    case = data.draw(ROUTING_CASES)
    try:
        found = check_routing_case(case, paths)
    except Refused:
        return
    assert found is None, found


def triton_cases(examples: int) -> None:
    """Run in a child with TRITON_INTERPRET=1 (Triton reads it when its kernels are imported)."""
    paths = paths_agree.available_paths()
    assert backend.TRITON in paths, f"the Triton path is not offered under its interpreter: {paths}"

    @settings(max_examples=examples, **BOUNDED)
    @given(st.data())
    def run(data):
        case = data.draw(ROUTING_CASES.filter(lambda c: c.decode_steps <= 24))
        try:
            found = check_routing_case(case, paths)
        except Refused:
            return
        assert found is None, found

    run()


@needs("extra", "triton is not installed (pip install triton)" if decode_step.triton is None else None)
def test_triton_path_agrees_in_its_interpreter(compiled_kernels):
    result = subprocess.run(
        [sys.executable, "-c", f"from tests.routing.test_paths_agree import triton_cases; "
                               f"triton_cases({CI_EXAMPLES['triton']})"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_evals_script_records_a_small_run(tmp_path, compiled_kernels):
    """evals/paths_agree.py end to end at a small size (the vLLM and Triton levels are covered above): counts,
    versions and the figure are written, and a run without findings exits 0."""
    import json

    from tests.figures import assert_png

    out = tmp_path / "paths_agree.json"
    run = subprocess.run([sys.executable, "evals/paths_agree.py", "--model", "4", "--routing", "6", "--triton", "0",
                          "--vllm", "0", "--families", "olmoe", "mixtral", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["findings"] == 0 and result["configurations"] == 10
    assert result["levels"]["model"]["paths"] == result["levels"]["routing"]["paths"] == ["torch", "cpu-kernels"]
    assert set(result["levels"]["model"]["families"]) <= {"olmoe", "mixtral"}
    assert result["versions"]["compiled_kernels"].startswith("compiled CPU kernels: loaded")
    assert_png(out.with_suffix(".png"))
