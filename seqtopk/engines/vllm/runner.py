"""vLLM's MoE runner with the router + experts call of SeqTopK layers replaced; every other layer runs as vLLM
runs it. A SeqTopK layer's routed experts run as one op: on CPU the compiled `seqtopk_cpu::moe_layer`
(seqtopk/kernels/cpu/moe.cpp), which vLLM's traced graph calls itself, elsewhere the Python op `seqtopk::moe`
(seqtopk.engines.vllm.router); its shared experts, if any, run beside it as vLLM runs them. Registered as
vLLM's MoERunner by seqtopk.engines.vllm.hooks.
"""

from __future__ import annotations

import torch

from seqtopk.kernels import ops


_RUNNER_CLASS: list = []


def runner_class():
    """The runner class (run_layer for SeqTopK layers), built once, on first use (it subclasses a vLLM class)."""
    if _RUNNER_CLASS:
        return _RUNNER_CLASS[0]
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    from seqtopk.engines.vllm.router import SeqTopKRouter

    class SeqTopKMoERunner(MoERunner):
        seqtopk_runner = True

        def _apply_quant_method(self, hidden_states, router_logits, shared_experts_input, input_ids=None,
                                shared_experts_overlapping=False):
            if not isinstance(self.router, SeqTopKRouter):
                return super()._apply_quant_method(hidden_states, router_logits, shared_experts_input, input_ids,
                                                   shared_experts_overlapping)
            return run_layer(self, hidden_states, router_logits, shared_experts_input, shared_experts_overlapping)

    _RUNNER_CLASS.append(SeqTopKMoERunner)
    return SeqTopKMoERunner


def whole_layer_kernel(runner) -> tuple[str, str]:
    """(activation, isa) of the experts kernel a compiled layer calls (constants to vLLM's traced graph), or a
    clear error when the layer's experts are not vLLM's unquantized CPU kernel."""
    from seqtopk.engines.vllm.router import whole_layer_experts

    found = whole_layer_experts(runner.routed_experts)
    if found is None:
        raise RuntimeError(f"SeqTopK's compiled MoE layer calls vLLM's unquantized CPU experts kernel, and this "
                           f"layer runs {type(runner.routed_experts.quant_method).__name__}; start the engine with "
                           "SEQTOPK_WHOLE_LAYER=0 to route it through the Python op")
    return found


def run_layer(runner, hidden_states, router_logits, shared_experts_input, shared_experts_overlapping):
    """A SeqTopK layer in place of the runner's router + experts call: the routed experts as one opaque op
    (seqtopk.engines.vllm.router.moe); the shared experts through their public calls, in the order vLLM's own
    `_apply_quant_method` makes them: run now unless vLLM already launched them on another stream (then
    awaited). The third order, inside the experts kernel, is refused at start-up (attach_state)."""
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    shared = runner.shared_experts
    shared_out = None
    if shared is not None:
        shared(shared_experts_input, SharedExpertsOrder.NO_OVERLAP)
        if shared_experts_overlapping:
            shared.wait()
        shared_out = shared.output
    router = runner.router
    if router.whole_layer:  # one compiled op, called by the traced graph itself (seqtopk/kernels/cpu/moe.cpp)
        experts = runner.routed_experts
        act, isa = whole_layer_kernel(runner)
        return shared_out, ops.moe_layer(hidden_states, router_logits, experts.w13_weight, experts.w2_weight,
                                         getattr(experts, "w13_bias", None), getattr(experts, "w2_bias", None),
                                         router.index, act, isa)
    return shared_out, torch.ops.seqtopk.moe(hidden_states, router_logits, router.index)
