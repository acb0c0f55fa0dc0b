"""SeqTopK inside a vLLM worker process: the hooks, the start-up check, and calls clients can make.

When SeqTopK is on, the engine configuration names `SeqTopKWorkerExtension` as vLLM's worker extension
(`--worker-extension-cls`). vLLM imports this module in each worker before it builds the model, and the
import installs the worker-side hooks:
- the MoE router factory, so each MoE layer is built with a SeqTopK router (seqtopk.engines.vllm.router);
- the MoE runner's router + experts call (vLLM's MoERunner replaced by a subclass through its public
  out-of-tree layer registry, `PluggableLayer.register_oot`): a SeqTopK layer's routed experts run as one op
  (routing, the chosen pairs through the layer's kernel, the combine), in eager and compiled modes alike: on CPU
  the compiled `seqtopk_cpu::moe_layer` (seqtopk/kernels/cpu/moe.cpp), which vLLM's traced graph calls itself,
  elsewhere the Python op `seqtopk::moe` (seqtopk.engines.vllm.router); its shared experts, if any, run beside
  it as vLLM runs them; every other layer is untouched;
- the step's input preparation, where each batch row's prompt length and decode band reach the device, and the
  model forward, around which the step's layout is handed to the compiled layers once (not once per layer);
- KV-cache set-up, after which every MoE layer is checked (no kernel that ignores the router, no layer
  left on its stock router), gets its paged routing state, and the start-up line is logged once.
The extension adds `seqtopk_stats`, `seqtopk_trace` and `seqtopk_band_counters` for `LLM.collective_rpc`.
"""

from __future__ import annotations

import logging

import torch

from seqtopk.engines.vllm.registry import WORKER
from seqtopk.kernels import ops

logger = logging.getLogger("vllm.seqtopk")  # under "vllm" so it shares vLLM's log handlers


class SeqTopKWorkerExtension:
    """Methods vLLM mixes into its worker class for `collective_rpc`."""

    def seqtopk_stats(self) -> dict:
        from seqtopk.engines.vllm import stats

        return stats.snapshot()

    def seqtopk_trace(self, on: bool) -> list:
        """Start recording chosen ids per token (on=True), or stop and return the records (on=False)."""
        from seqtopk.engines.vllm import stats

        if on:
            stats.start_trace()
            return []
        return stats.stop_trace()

    def seqtopk_band_counters(self) -> dict | None:
        """This worker's decode band counters since it started (stats.band_counters); None on the torch path."""
        from seqtopk.engines.vllm import stats

        return stats.band_counters()


def _install() -> None:
    import vllm.model_executor.layers.fused_moe.layer as fused_moe_layer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from seqtopk.engines.vllm.router import wrap_router_factory

    factory = fused_moe_layer.create_fused_moe_router
    if not getattr(factory, "seqtopk_wrapped", False):
        fused_moe_layer.create_fused_moe_router = wrap_router_factory(factory)
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

    # vLLM's out-of-tree layer replacement (a public extension point, no patch): every MoERunner this worker
    # builds is a SeqTopKMoERunner.
    current = op_registry_oot.get("MoERunner")
    if current is None:
        PluggableLayer.register_oot(runner_class(), name="MoERunner")
    elif not getattr(current, "seqtopk_runner", False):
        raise RuntimeError(f"another vLLM plugin replaced vLLM's MoERunner ({current.__module__}."
                           f"{current.__qualname__}); SeqTopK cannot run beside it")
    prepare = GPUModelRunner._prepare_inputs
    if not getattr(prepare, "seqtopk_wrapped", False):
        def _prepare_inputs(self, scheduler_output, *args, **kwargs):
            out = prepare(self, scheduler_output, *args, **kwargs)
            refresh_step_rows(self, scheduler_output)
            return out

        _prepare_inputs.seqtopk_wrapped = True
        GPUModelRunner._prepare_inputs = _prepare_inputs
    forward = GPUModelRunner._model_forward
    if not getattr(forward, "seqtopk_wrapped", False):
        def _model_forward(self, *args, **kwargs):
            if not whole_layers() or not serves_seqtopk(self):  # (another engine in this process runs stock)
                return forward(self, *args, **kwargs)
            step = set_whole_layer_step(self, kwargs)
            try:
                return forward(self, *args, **kwargs)
            finally:
                ops.moe_clear_step()  # a later forward without a step (warm-up) must not reuse this one
                after_whole_layer_step(step)

        _model_forward.seqtopk_wrapped = True
        GPUModelRunner._model_forward = _model_forward
    original = GPUModelRunner.initialize_kv_cache
    if getattr(original, "seqtopk_wrapped", False):
        return

    def initialize_kv_cache(self, kv_cache_config, is_profiling=False, *args, **kwargs):
        original(self, kv_cache_config, is_profiling, *args, **kwargs)
        attach_state(self, kv_cache_config, log=not is_profiling)

    initialize_kv_cache.seqtopk_wrapped = True
    GPUModelRunner.initialize_kv_cache = initialize_kv_cache


_RUNNER_CLASS: list = []


def runner_class():
    """vLLM's MoERunner with the router + experts call of SeqTopK layers replaced (run_layer); every other layer
    runs as vLLM runs it. Built once, on first use (it subclasses a vLLM class)."""
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


def serves_seqtopk(runner) -> bool:
    """Whether `runner` is the model runner SeqTopK's routing state is attached to."""
    from seqtopk.engines.vllm.registry import WORKER

    source = WORKER.source
    return source.runner is not None and source.runner() is runner


def whole_layers() -> list:
    """This worker's routers that run as one compiled op."""
    from seqtopk.engines.vllm.registry import WORKER

    return [router for router in WORKER.routers.values() if router.whole_layer_ready and router.store is not None]


def set_whole_layer_step(runner, forward_args: dict):
    """Hand the forward's layout to the compiled layers, once for all of them (inside vLLM's forward context), built
    in C++ from the runner's step buffers (step.hand_engine_step). Returns None, and hands nothing over, for a
    forward that routes no request; else the Python layout while a client traces (its records need it), True
    otherwise."""
    from seqtopk.engines.vllm.step import current_step, hand_engine_step

    positions, input_ids = forward_args.get("positions"), forward_args.get("input_ids")
    tokens = positions.shape[-1] if positions is not None else input_ids.shape[0]
    if not hand_engine_step(runner, tokens, whole_layers()[0].cfg):
        return None
    return current_step(tokens) if WORKER.trace is not None else True


def after_whole_layer_step(step) -> None:
    """What the Python op does after each layer (stats.after_step: trace records, the periodic log line), once
    per forward for the compiled layers, from the routing each kept (ops.moe_last) while a client traces.
    step: what set_whole_layer_step returned."""
    from seqtopk.engines.vllm import stats
    from seqtopk.routing.router import Routed

    if step is None:
        return
    if WORKER.trace is None:  # (the periodic log line only, as the first layer writes it)
        stats.after_step(WORKER.first_router(), step, None)
        return
    for router in whole_layers():
        last = ops.moe_last(router.index)
        if not last:
            continue
        values, mask, ids, weights, token, expert, weight = last
        routed = Routed(values=values, mask=mask, ids=ids, weights=weights)
        routed.kernel = (token, expert, weight)
        stats.after_step(router, step, routed)


def refresh_step_rows(runner, scheduler_output) -> None:
    """Before the forward: copy the batch rows' prompt lengths and decode bands into the device buffers the
    routing step reads (a CUDA graph replay reads them there without running any of our Python). Finished
    requests give their bands back."""
    from seqtopk.engines.vllm.registry import WORKER
    from seqtopk.routing.paged import mark_stale

    source = WORKER.source
    if source.prompt_lens is None or not serves_seqtopk(runner):
        return
    rows = runner.input_batch.num_reqs
    source.prompt_lens[:rows].copy_(runner.input_batch.num_prompt_tokens_cpu_tensor[:rows], non_blocking=True)
    if source.bands is None:
        return
    source.bands.release(getattr(scheduler_output, "finished_req_ids", None) or ())
    req_ids = list(runner.input_batch.req_ids[:rows])
    stale: list[int] = []
    bands = source.bands.assign(req_ids, stale)
    if stale:
        index = torch.tensor(stale, dtype=torch.long, device=runner.device)
        for router in WORKER.routers.values():
            if router.bands is not None:
                mark_stale(router.bands, index)
    source.row_band[:rows].copy_(torch.tensor(bands, dtype=torch.long), non_blocking=True)


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


def attach_state(runner, kv_cache_config, log: bool = True) -> None:
    """Check every MoE layer, allocate its paged routing state, and log what runs SeqTopK."""
    import torch
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from seqtopk.engines.vllm import stats
    from seqtopk.engines.vllm.registry import WORKER, BandSlots
    from seqtopk.engines.vllm.router import CALL_FLOPS, SeqTopKRouter
    from seqtopk.engines.vllm.settings import active
    from seqtopk.kernels.paths import new_bands

    settings = active(runner.vllm_config)
    if settings is None:
        return
    layers = {name: layer for name, layer in runner.compilation_config.static_forward_context.items()
              if isinstance(layer, MoERunner)}
    stock = [name for name, layer in layers.items() if not isinstance(layer.router, SeqTopKRouter)]
    if stock:
        raise RuntimeError(f"SeqTopK could not replace the router of MoE layer(s) {stock}: they were built "
                           "with their own router; this model is not supported")
    other = [name for name, layer in layers.items() if not getattr(layer, "seqtopk_runner", False)]
    if other:
        raise RuntimeError(f"SeqTopK could not replace the runner of MoE layer(s) {other} "
                           f"({type(layers[other[0]]).__name__}, a model's own runner class); this model is not "
                           "supported")
    overlapped = [name for name, layer in layers.items() if layer.shared_experts is not None
                  and layer.routed_experts.quant_method.mk_can_overlap_shared_experts]
    if overlapped:
        # the op calls the experts kernel without the shared experts, which that kernel would have run
        raise RuntimeError(f"SeqTopK cannot run MoE layer(s) {overlapped}: their experts kernel runs the shared "
                           "experts inside its dispatch (all-to-all); run without expert parallelism")
    fused = [name for name, layer in layers.items() if layer.is_monolithic]
    if fused:
        raise RuntimeError(f"SeqTopK cannot run MoE layer(s) {fused}: their kernel "
                           f"({type(layers[fused[0]].routed_experts.quant_method).__name__}) routes inside "
                           "the kernel and ignores the router; choose another MoE backend or quantization")
    if not layers:
        if runner.parallel_config.pipeline_parallel_size > 1:
            WORKER.keep_routers([])  # a pipeline stage of dense layers only: the other stages route
            return
        raise RuntimeError("SeqTopK is on, but this model has no fused MoE layer to route")
    groups = [(i, g) for i, g in enumerate(kv_cache_config.kv_cache_groups)
              if isinstance(g.kv_cache_spec, FullAttentionSpec) and g.layer_names]
    if not groups:
        if runner.parallel_config.pipeline_parallel_size > 1:
            # e.g. a stage of GPT-OSS's sliding-window layers only: their KV cache keeps just the window
            raise RuntimeError("SeqTopK keeps its routing state next to a full-attention KV cache, and this "
                               "pipeline stage has none (its layers attend over a sliding window only); split the "
                               "layers so that every stage holds a full-attention layer (VLLM_PP_LAYER_PARTITION)")
        raise RuntimeError("SeqTopK keeps its routing state next to a full-attention KV cache, which this "
                           "model does not have")
    index, group = groups[0]
    slots = kv_cache_config.num_blocks * group.kv_cache_spec.block_size
    max_reqs = runner.input_batch.max_num_reqs
    band_slots = BandSlots(capacity=2 * max_reqs)  # running requests, and as many preempted ones
    for name, layer in layers.items():
        router = layer.router
        router.layer_name = name
        router.runner = layer
        router.store = torch.zeros(slots + 1, router.cfg.cap, dtype=torch.float32, device=runner.device)
        router.bands = new_bands(band_slots.capacity, runner.device) if runner.device.type == "cpu" else None
        # allocated before any CUDA graph capture, which adds to them in place
        router.counts = torch.zeros(len(stats.COUNTERS), dtype=torch.long, device=runner.device)
        moe = layer.moe_config
        router.call_rows = max(1.0, CALL_FLOPS / (6.0 * moe.hidden_dim * max(moe.intermediate_size_per_partition, 1)))
        if router.whole_layer_ready:
            if router.whole_layer:
                whole_layer_kernel(layer)
            router.configure_whole_layer()
            ops.moe_attach(router.index, router.store, router.bands, router.counts)
    routers = [layer.router for layer in layers.values()]
    WORKER.keep_routers(routers)
    WORKER.attach(runner, index, slots + 1, torch.zeros(max_reqs, dtype=torch.long, device=runner.device),
                  row_band=torch.full((max_reqs,), -1, dtype=torch.long, device=runner.device),
                  bands=band_slots if routers[0].bands is not None else None)
    state_bytes = 4 * routers[0].cfg.cap
    kv_bytes = group.kv_cache_spec.page_size_bytes // group.kv_cache_spec.block_size
    band_bytes = sum(r.bands.numel() for r in routers if r.bands is not None)
    WORKER.memory.update(
        state_bytes_per_token=sum(4 * r.cfg.cap for r in routers),
        kv_bytes_per_token=sum(g.kv_cache_spec.page_size_bytes // g.kv_cache_spec.block_size * len(g.layer_names)
                               for g in kv_cache_config.kv_cache_groups),
        store_bytes=sum(r.store.numel() * r.store.element_size() for r in routers), band_bytes=band_bytes)
    if not log:  # a profiling set-up: the real one follows
        return
    from seqtopk.kernels.backend import describe as kernels

    logger.info("SeqTopK routing on %d MoE layer(s) (%s ... %s): %s; routing state %d B/token/layer next to "
                "%d B/token/layer of KV cache (%.2f%%), plus %d KiB of decode bands; each layer runs as one op "
                "(%s) whose experts compute the chosen pairs only; routing: %s",
                len(routers), routers[0].layer_name, routers[-1].layer_name, describe(routers[0].cfg), state_bytes,
                kv_bytes, 100.0 * state_bytes / kv_bytes, band_bytes // 1024,
                "seqtopk_cpu::moe_layer, compiled" if routers[0].whole_layer else "seqtopk::moe, in Python",
                kernels(runner.device))


def describe(cfg) -> str:
    return (f"k={cfg.k} cap={cfg.cap} min_experts={cfg.min_experts} exact_budget={cfg.exact_budget} "
            f"prefill={cfg.prefill} decode={cfg.decode}")


# Installed at import, not by a call: vLLM imports the worker-extension module (named by the settings) in
# each worker before it builds the model, and offers no other hook that runs there at that time.
_install()
