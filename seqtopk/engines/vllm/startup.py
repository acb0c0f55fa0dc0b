"""A vLLM worker's SeqTopK start-up, once its KV cache is set up (hook 7 of seqtopk.engines.vllm.hooks): every
MoE layer checked (no kernel that ignores the router, no layer left on its stock router), its paged routing
state allocated next to the KV cache, and the start-up line logged once.
"""

from __future__ import annotations

import logging

from seqtopk.engines.vllm.runner import whole_layer_kernel
from seqtopk.kernels import ops

logger = logging.getLogger("vllm.seqtopk")  # under "vllm" so it shares vLLM's log handlers


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
