"""Small runs of the routing benchmarks' scripts (evals/), so they keep working between recorded runs.

Speed is not asserted here (the scripts record ratios measured side by side); these check that each script
runs every path it has on this machine and writes its JSON and PNG.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(REPO / "evals" / name), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_gpu_routing_bench_runs_small(tmp_path):
    out = tmp_path / "gpu_routing.json"
    run_script("bench_gpu_routing.py", "--device", "cpu", "--tokens", "256", "--rows", "4", "--context", "40",
               "--repeats", "3", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["ratio_to_stock"]) == {"prefill", "decode"}
    for group in ("prefill", "decode"):
        assert result["ratio_to_stock"][group]["stock topk"] == 1.0
        assert result["ms"][group]["seqtopk torch"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_decode_routing_bench_runs_small(tmp_path):
    out = tmp_path / "decode_routing.json"
    run_script("bench_decode_routing.py", "--contexts", "16", "48", "--rows", "4", "--steps", "5", "--check-steps", "5",
               "--out", str(out))  # the script first checks every path against the torch rule (it fails if one differs)
    result = json.loads(out.read_text())
    assert set(result["us_per_layer_step"]) == {"topk", "compiled", "compiled-walk", "torch"}
    assert set(result["ratio_vs_topk"]["compiled"]) == {"16", "48"}
    assert out.with_suffix(".png").stat().st_size > 0


def test_budget_sweep_runs_small(tmp_path, shared_data):
    """evals/budget_sweep.py's quality, lm-eval and transformers speed parts at toy size (the vLLM part is the
    same bench_vllm rounds over engines started with hf_overrides and fractional settings, which
    tests/vllm/test_budgets.py serves for real)."""
    out = tmp_path / "budget_sweep.json"
    run_script("budget_sweep.py", "--small", "--parts", "quality", "lm-eval", "hf", "--seeds", "0,1", "--out", str(out))
    result = json.loads(out.read_text())
    for model in ("demo", "repro"):
        tuned = result["quality"][model]["fine_tuned"]
        assert set(tuned) == {"topk-2", "topk-1", "seqtopk-2", "seqtopk-1.5", "seqtopk-1", "seqtopk-0.5"}
        assert all(len(row["per_seed"]) == 2 for row in tuned.values())
        assert tuned["seqtopk-0.5"]["experts_per_token"] < 0.75 < tuned["seqtopk-1"]["experts_per_token"]
        assert set(result["quality"][model]["verdict"]) == {"switched_on k=1", "fine_tuned k=1"}
    switched = result["quality"]["demo"]["switched_on"]
    assert {"seqtopk-1.25", "seqtopk-0.75"} <= set(switched)
    lm = result["lm_eval"]["results"]
    assert lm["topk-2"]["bits_per_byte"] < result["lm_eval"]["chance_bits_per_byte"] / 2  # far from chance
    assert lm["topk-1"]["bits_per_byte"] != lm["topk-2"]["bits_per_byte"]
    for phase in ("prefill", "decode"):
        assert set(result["hf"]["ratios"][phase]) == {"k=8", "k=6", "k=4", "k=2"}
        assert result["hf"]["ratios"][phase]["k=8"]["topk_speedup_over_topk_K"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0
