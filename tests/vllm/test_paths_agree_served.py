"""The differential checker's vLLM level (seqtopk.testing.paths_agree.check_served_case) on the shared serving
engine: drawn batches of requests, sent together (continuous batching, preemption in its small KV cache), routed as
the rule says for every token and layer. evals/paths_agree.py --vllm draws the engine settings too."""

import pytest
from hypothesis import HealthCheck, given, settings

from seqtopk.testing.paths_agree import ServedCase, check_served_case, served_strategies

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm]


def test_served_batches_follow_the_rule(serving_engine, vllm_helpers):
    from seqtopk.config import SeqTopKConfig

    config = serving_engine.llm_engine.model_config
    top_k, experts = config.hf_config.num_experts_per_tok, config.hf_config.num_experts
    cfg = SeqTopKConfig(**vllm_helpers.settings).resolve(top_k, experts)
    _, served_cases = served_strategies(vocab=300, max_len=96)
    tally: dict = {}

    @settings(max_examples=6, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=served_cases)
    def check(case):
        found = check_served_case(serving_engine, case, cfg, tally)
        assert found is None, found

    check()
    assert tally["tokens"] > 0 and tally["routings"] >= 6
    # the compiled layer op served them (CPU kernels loaded), and its experts kernel got exactly the chosen pairs
    assert tally["kernel_records"] > 0, tally
    case = ServedCase(prompts=((5, 6, 7, 8, 9), (10, 11)), max_tokens=(6, 3))
    assert check_served_case(serving_engine, case, cfg, k=cfg.k + 1) is not None, "the check cannot fail"
