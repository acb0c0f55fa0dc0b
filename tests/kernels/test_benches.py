"""Small runs of the routing benchmarks' scripts (evals/), so they keep working between recorded runs.

Speed is not asserted here (the scripts record ratios measured side by side, on 2 shared cores the figures
are noise): these check that each script ran every path it has on this machine at the configuration asked
for, that each figure is a finite positive measurement, that each ratio is the quotient of the figures it
names, that budgets are the ones requested (experts per token near k), and that the PNG is a real image.
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.figures import assert_png

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "evals" / name), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_routing_bench_runs_small(tmp_path):
    out = tmp_path / "gpu_routing.json"
    printed = run_script("bench_gpu_routing.py", "--device", "cpu", "--tokens", "256", "--rows", "4", "--context", "40",
                         "--repeats", "3", "--out", str(out))
    result = json.loads(out.read_text())
    assert {k: result["shape"][k] for k in ("device", "tokens", "rows", "context", "repeats", "k", "cap", "experts")} \
        == dict(device="cpu", tokens=256, rows=4, context=40, repeats=3, k=8, cap=10, experts=64)
    # on the CPU: stock TopK and the torch reference of the SeqTopK path (the fused ones need CUDA)
    assert set(result["ms"]) == set(result["ratio_to_stock"]) == {"prefill", "decode"}
    for group, times in result["ms"].items():
        assert set(times) == set(result["ratio_to_stock"][group]) == {"stock topk", "seqtopk torch"}, group
        assert all(positive(ms) for ms in times.values()), times
        for name, ratio in result["ratio_to_stock"][group].items():
            assert ratio == pytest.approx(times[name] / times["stock topk"], rel=1e-12), (group, name)
            assert f"{group:8s} {name:28s}" in printed
    assert_png(out.with_suffix(".png"))


def test_decode_routing_bench_runs_small(tmp_path, compiled_kernels):  # it measures the compiled op
    out = tmp_path / "decode_routing.json"
    run_script("bench_decode_routing.py", "--contexts", "16", "48", "--rows", "4", "--steps", "5", "--check-steps", "5",
               "--out", str(out))  # the script first checks every path against the torch rule (it fails if one differs)
    result = json.loads(out.read_text())
    assert (result["rows"], result["timed_steps"], result["checked_steps"]) == (4, 5, 5)
    paths, contexts = {"topk", "compiled", "compiled-walk", "torch"}, {"16", "48"}
    for key in ("us_per_layer_step", "mean_us_per_layer_step"):
        assert set(result[key]) == paths, key
        for path, per_context in result[key].items():
            assert set(per_context) == contexts and all(positive(us) for us in per_context.values()), (key, path)
    for key, times in (("ratio_vs_topk", "us_per_layer_step"), ("mean_ratio_vs_topk", "mean_us_per_layer_step")):
        assert set(result[key]) == paths - {"topk"}, key
        for path, per_context in result[key].items():
            assert set(per_context) == contexts
            for c, ratio in per_context.items():
                assert ratio == pytest.approx(result[times][path][c] / result[times]["topk"][c], rel=1e-12)
    for key in ("compiled_first_step_us", "layout_us_per_step"):
        assert set(result[key]) == contexts and all(positive(us) for us in result[key].values()), key
    # band rebuilds per timed step of the compiled path: counted, and at most one per row per step
    builds = result["band_builds_per_step"]
    assert set(builds) == contexts and all(isinstance(b, float) and 0 <= b <= 4 for b in builds.values()), builds
    assert_png(out.with_suffix(".png"))


def test_budget_sweep_runs_small(tmp_path, shared_data):
    """evals/budget_sweep.py's quality, lm-eval and transformers speed parts at toy size (the vLLM part is the
    same bench_vllm rounds over engines started with hf_overrides and fractional settings, which
    tests/vllm/test_budgets.py serves for real)."""
    out = tmp_path / "budget_sweep.json"
    run_script("budget_sweep.py", "--small", "--parts", "quality", "lm-eval", "hf", "--seeds", "0,1", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result) >= {"quality", "lm_eval", "hf"}
    assert result["quality"]["setup"]["seeds"] == [0, 1] and result["quality"]["setup"]["top_k"] == 2

    def k_of(label: str) -> float:
        return float(label.split("-")[1])

    def check_budgets(rows: dict, what: str) -> None:
        """TopK at k spends exactly k experts per token; SeqTopK at k spends k on average over the held-out
        text (within 20%: the causal rule evaluates, its running budget is not exact on a few thousand
        tokens), so more experts for a larger k."""
        for label, row in rows.items():
            if label.startswith("topk-"):
                assert row["experts_per_token"] == k_of(label), (what, label)
            else:
                assert row["experts_per_token"] == pytest.approx(k_of(label), rel=0.2), (what, label, row)
        seq = sorted((k_of(label), row["experts_per_token"]) for label, row in rows.items()
                     if label.startswith("seqtopk-"))
        assert [e for _, e in seq] == sorted(e for _, e in seq), (what, seq)

    budgets = {"topk-2", "topk-1", "seqtopk-2", "seqtopk-1.5", "seqtopk-1", "seqtopk-0.5"}
    for model in ("demo", "repro"):
        for stage in ("switched_on", "fine_tuned"):
            rows = result["quality"][model][stage]
            assert budgets <= set(rows), (model, stage)
            if stage == "fine_tuned":
                assert set(rows) == budgets
                assert all(len(row["per_seed"]) == 2 for row in rows.values())
            check_budgets(rows, f"{model} {stage}")
            reference = rows["topk-2"]
            for label, row in rows.items():
                assert all(positive(loss) for loss in row["per_seed"]), (model, stage, label)
                assert row["held_out_loss"] == pytest.approx(statistics.mean(row["per_seed"]), rel=1e-9)
                # paired with TopK at the model's own k, seed by seed
                assert row["minus_topk_K_per_seed"] == pytest.approx(
                    [a - b for a, b in zip(row["per_seed"], reference["per_seed"])], abs=1e-9)
            assert reference["minus_topk_K"] == 0.0
        assert set(result["quality"][model]["verdict"]) == {"switched_on k=1", "fine_tuned k=1"}
        for stage in ("switched_on", "fine_tuned"):
            rows, verdict = result["quality"][model][stage], result["quality"][model]["verdict"][f"{stage} k=1"]
            ref = rows["topk-2"]["held_out_loss"]
            assert verdict["topk_loses"] == pytest.approx(rows["topk-1"]["held_out_loss"] - ref, abs=1e-9)
            assert verdict["seqtopk_loses"] == pytest.approx(rows["seqtopk-1"]["held_out_loss"] - ref, abs=1e-9)
            assert verdict["seqtopk_loses_at_most_half"] == (verdict["seqtopk_loses"] <= 0.5 * verdict["topk_loses"])
    switched = result["quality"]["demo"]["switched_on"]
    assert {"seqtopk-1.25", "seqtopk-0.75"} <= set(switched)
    # a budget of half an expert per token costs the shipped demo model far more than top-1 does
    assert switched["seqtopk-0.5"]["minus_topk_K"] > switched["topk-1"]["minus_topk_K"] > 0

    lm = result["lm_eval"]["results"]
    assert set(lm) == budgets
    check_budgets(lm, "lm-eval")
    for label, row in lm.items():
        assert 0 < row["bits_per_byte"] < result["lm_eval"]["chance_bits_per_byte"] / 2, label  # far from chance
        assert row["byte_perplexity"] == pytest.approx(2 ** row["bits_per_byte"], rel=1e-6), label
    assert lm["topk-1"]["bits_per_byte"] > lm["topk-2"]["bits_per_byte"]  # one expert fewer costs

    hf = result["hf"]
    ks = {"k=8": 8, "k=6": 6, "k=4": 4, "k=2": 2}
    for phase in ("prefill", "decode"):
        rates = hf["tokens_per_s"][phase]
        assert set(rates) == {f"{r}-{k}" for r in ("topk", "seqtopk") for k in ks.values()}, phase
        assert all(positive(rate) for rate in rates.values()), rates
        assert set(hf["ratios"][phase]) == set(ks)
        for label, k in ks.items():
            ratios = hf["ratios"][phase][label]
            assert ratios["topk_speedup_over_topk_K"] == pytest.approx(rates[f"topk-{k}"] / rates["topk-8"])
            assert ratios["seqtopk_speedup_over_topk_K"] == pytest.approx(rates[f"seqtopk-{k}"] / rates["topk-8"])
            assert ratios["seqtopk_over_topk_same_k"] == pytest.approx(rates[f"seqtopk-{k}"] / rates[f"topk-{k}"])
    assert_png(out.with_suffix(".png"))


def test_moe_layer_bench_runs_small(tmp_path, compiled_kernels):  # the compiled layer op and vLLM's CPU kernel
    from seqtopk.testing.require import require_vllm

    require_vllm()
    out = tmp_path / "moe_layer.json"
    run_script("bench_moe_layer.py", "--shape", "small", "--loads", "decode", "prefill", "--budgets", "8", "2",
               "--sharpness", "trained-like", "sharp", "--steps", "3", "--warm", "1", "--out", str(out))
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert {(r["load"], r["k"], r["prefill"], r["sharpness"]) for r in runs} == {
        (load, k, rule, level) for load in ("decode", "prefill") for k in (8, 2) for level in ("trained-like", "sharp")
        for rule in (("sequence", "causal") if load == "prefill" else ("sequence",))}
    for r in runs:
        assert all(positive(us) for us in r["us_median"].values()), r
        assert r["ratio_whole_layer"] == pytest.approx(r["us_median"]["stock"] / r["us_median"]["whole-layer"])
        assert abs(r["experts_per_token"] - r["k"]) < 0.15 * r["k"], r  # the budget asked for was spent
        # rows computed inside the op: exactly the chosen pairs (one pass over the experts, no padding)
        assert r["rows_per_token"] == pytest.approx(r["experts_per_token"], rel=1e-9), r
    sharp, trained = (statistics.mean(r["entropy"] for r in runs if r["sharpness"] == s) for s in ("sharp", "trained-like"))
    assert 0.1 < sharp < 0.2 and 0.35 < trained < 0.45, (sharp, trained)
    assert result["summary"]["ratio"]["small"]["decode"]["worst"] == pytest.approx(
        min(r["ratio_whole_layer"] for r in runs if r["load"] == "decode"), abs=1e-3)
    assert_png(out.with_suffix(".png"))


def test_vllm_bench_pairs_run_small(tmp_path, compiled_kernels):
    """evals/bench_vllm.py's paired method at toy size: the SeqTopK engine beside its stock engine in one process,
    engine steps interleaved on the same fresh prompts (the same number of steps on both: step i is the same batch);
    a round's time is the sum of its steps, each ratio is the median of same-round quotients, the router's entropy
    is recorded, and the rows computed follow the budget (k'=1 with min_experts=0: about one a token)."""
    from seqtopk.testing.require import require_vllm

    require_vllm()
    out = tmp_path / "vllm_bench.json"
    run_script("bench_vllm.py", "--scale", "0.1", "--rounds", "3", "--sharpness", "sharp", "--budgets", "1",
               "--budgets-only", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["method"].startswith("paired") and set(result["engines"]) == {"topk-k1", "seqtopk-k1"}
    level = result["sharpness"]["sharp"]
    assert 0.1 < level["normalised_entropy"] < 0.2
    for load, spec in result["loads"].items():
        metric = spec["metric"]
        ours, stock = level["rounds"][load]["seqtopk-k1"], level["rounds"][load]["topk-k1"]
        assert [x["round"] for x in ours] == [x["round"] for x in stock] == [0, 1, 2]
        same_round = [a[metric] / b[metric] for a, b in zip(ours, stock)]
        assert [x["ratio"] for x in ours] == pytest.approx(same_round, rel=1e-12)
        assert level["ratio"][load]["seqtopk-k1"] == pytest.approx(statistics.median(same_round), rel=1e-12)
        assert level["session_spread"][load]["seqtopk-k1 ratio"] == pytest.approx([min(same_round), max(same_round)])
        assert all(positive(x[metric]) and x["load_before"] >= 0 for x in ours + stock)
        for a, b in zip(ours, stock):
            assert a["steps"] == b["steps"] == len(a["step_s"]) == len(b["step_s"]) >= 2, (a["steps"], b["steps"])
            assert a["wall_s"] == pytest.approx(sum(a["step_s"]), rel=1e-4)
    summary = result["summary"]  # every cell against the target, and each round split into its first step and the rest
    cells = [v for entry in result["sharpness"].values() for per in entry["ratio"].values() for v in per.values()]
    assert summary["cells"] == len(cells) == 2
    assert summary["at_target"] == sum(c >= result["target_ratio"] for c in cells)
    for load in result["loads"]:
        ours, stock = level["rounds"][load]["seqtopk-k1"], level["rounds"][load]["topk-k1"]
        first = statistics.median(b["step_s"][0] / a["step_s"][0] for a, b in zip(ours, stock))
        assert summary["step_split"]["sharp"][load]["seqtopk-k1"]["first_step"] == pytest.approx(first, abs=1e-4)
    assert level["routing"]["seqtopk-k1"]["layer_paths"] == ["compiled layer op"]
    rows = level["routing"]["seqtopk-k1"]["expert_rows_per_token"]
    assert all(0.8 < r < 1.2 for r in rows), rows
    assert_png(out.with_suffix(".png"))


def test_step_hooks_bench_runs_small(tmp_path, compiled_kernels):
    """evals/bench_step_hooks.py at toy size: every hook piece timed on the engine's steps, the row refresh with its
    skip on and off on alternate steps; with it off every call writes the buffers, with it on the decode steps (the
    same requests in the same rows) write nothing."""
    from seqtopk.testing.require import require_vllm

    require_vllm()
    out = tmp_path / "step_hooks.json"
    run_script("bench_step_hooks.py", "--rounds", "1", "--scale", "0.1", "--out", str(out))
    result = json.loads(out.read_text())
    pieces = result["pieces"]
    assert set(pieces) == {"refresh (skip on)", "refresh (skip off)", "hand step", "after forward"}
    on, off = pieces["refresh (skip on)"], pieces["refresh (skip off)"]
    assert abs(on["calls"] - off["calls"]) <= 1 and on["calls"] + off["calls"] == result["steps"] >= 8
    assert pieces["hand step"]["calls"] == pieces["after forward"]["calls"] == result["steps"]
    assert all(positive(p["us_median"]) for p in pieces.values())
    for p in pieces.values():
        assert p["share_of_step"] == pytest.approx(p["us_median"] / result["step_us_median"], abs=1e-3)
    assert result["refresh_calls_that_wrote"]["skip off"] == off["calls"]
    assert result["refresh_calls_that_wrote"]["skip on"] < on["calls"] / 2
    assert result["refresh_saved_us"] == pytest.approx(off["us_median"] - on["us_median"], abs=0.2)
    assert 0.1 < result["normalised_entropy"] < 0.2
    assert_png(out.with_suffix(".png"))
