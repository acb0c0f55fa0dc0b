"""Every vLLM name the SeqTopK plugin reaches, with the parameters it passes or binds and the attributes it reads.

One list, `SYMBOLS`, read by two checks: seqtopk.engines.vllm.compat.check_live() imports each name from the
installed vLLM (at start-up on an untested vLLM the user allowed, and in tests/vllm/test_compat.py), and
seqtopk.testing.vllm_tree.check_tree() finds each in a vLLM source tree without importing it
(evals/vllm_compat.py). tests/vllm/test_compat.py fails when the plugin imports a vLLM name listed nowhere here.
This module imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Symbol:
    """One vLLM name the plugin uses. `name` is dotted inside `module` ("Class.method").

    params: parameter names the plugin passes, binds or receives (must exist by name); for a patched function,
        its leading parameters in order (the wrapper forwards them positionally).
    attrs: attributes the plugin reads off the object or its instances (fields, properties, methods, enum
        members, or `self.x = ...` in any method of the class or a vLLM base class).
    called: for a hook that replaces a module global or a method, the call that must still reach it
        (source text of the call's function, in `module`), so the hook is not silently skipped.
    abstract: for a class the plugin subclasses: its abstract methods (a new one would break the subclass).
    strings: names the plugin gives vLLM as strings (op names, environment variables): constants in `module`.
    bases: names of classes the class must derive from (directly or not).
    returns: for a function whose result the plugin relies on: names it must return (under `if <when>:` when
        `when` is given, the condition's source text); each must be a plain Python function of `module`.
    registers: for a function that builds a layer's weights: the parameter names it registers on it
        (`layer.register_parameter("name", ...)`), which the plugin reads off the layer as attributes.
    """

    module: str
    name: str
    params: tuple[str, ...] = ()
    ordered: bool = False
    attrs: tuple[str, ...] = ()
    called: str = ""
    abstract: tuple[str, ...] | None = None
    strings: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    when: str = ""
    registers: tuple[str, ...] = ()
    use: str = ""


_FUSED_MOE = "vllm.model_executor.layers.fused_moe"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
# The factory arguments router.scoring_for reads (bound by name, so a renamed one would read a default).
ROUTER_ARGS = ("top_k", "global_num_experts", "renormalize", "use_grouped_topk", "num_expert_group", "topk_group",
               "scoring_func", "num_fused_shared_experts", "routed_scaling_factor", "e_score_correction_bias",
               "custom_routing_function", "eplb_state", "zero_expert_type", "hash_indices_table", "bias_vl")

SYMBOLS: tuple[Symbol, ...] = (
    # --- runtime patches (6): each wraps a vLLM function and calls the original
    Symbol("vllm.engine.arg_utils", "EngineArgs.create_engine_config",
           use="patch: validate SeqTopK settings, adjust engine arguments, name the worker extension"),
    Symbol("vllm.engine.arg_utils", "EngineArgs",
           attrs=("additional_config", "enable_dbo", "speculative_config", "worker_extension_cls",
                  "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "enable_expert_parallel",
                  "enable_eplb", "enforce_eager", "enable_chunked_prefill", "enable_prefix_caching",
                  "kv_transfer_config", "kv_offloading_size", "kv_offloading_backend"),
           use="the engine arguments settings.prepare_engine_args reads and adjusts"),
    Symbol("vllm.config.kv_transfer", "KVTransferConfig", attrs=("kv_connector",),
           use="a KV connector is refused with SeqTopK on (settings.kv_loading_problems)"),
    Symbol(f"{_FUSED_MOE}.layer", "create_fused_moe_router", params=ROUTER_ARGS, called="create_fused_moe_router",
           use="patch: a SeqTopK router for each MoE layer (vLLM has no router registry)"),
    Symbol(_RUNNER, "GPUModelRunner._prepare_inputs", params=("scheduler_output",), ordered=True,
           called="self._prepare_inputs", use="patch: prompt lengths and decode bands to the device before a step"),
    Symbol(_RUNNER, "GPUModelRunner.initialize_kv_cache", params=("kv_cache_config", "is_profiling"), ordered=True,
           use="patch: routing state allocated beside the KV cache, layers checked"),
    Symbol(_RUNNER, "GPUModelRunner._model_forward", params=("input_ids", "positions"), called="self._model_forward",
           use="patch: the step's layout handed to the compiled layer ops once per forward (inside the forward "
               "context); dummy runs call the model directly and route plain TopK"),
    Symbol("vllm.entrypoints.launchers.api_server.entry", "init_app_state", params=("engine_client", "state", "args"),
           ordered=True, called="init_app_state", use="patch: start the /metrics poller with the engine client"),
    Symbol("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", called="self.model_runner.initialize_kv_cache",
           use="the call that reaches the initialize_kv_cache patch"),
    # --- an override through a public extension point (in place of a patch before)
    Symbol(f"{_FUSED_MOE}.runner.moe_runner", "MoERunner._apply_quant_method", ordered=True,
           params=("hidden_states", "router_logits", "shared_experts_input", "input_ids", "shared_experts_overlapping"),
           called="self._apply_quant_method",
           use="overridden by SeqTopKMoERunner: a SeqTopK layer's routed experts as one opaque op"),
    Symbol(f"{_FUSED_MOE}.runner.moe_runner", "MoERunner", bases=("PluggableLayer",),
           use="instantiated through PluggableLayer.__new__, which honours out-of-tree replacements"),
    Symbol("vllm.model_executor.custom_op", "PluggableLayer", attrs=("register_oot", "__new__"),
           use="public out-of-tree layer registry: SeqTopKMoERunner replaces MoERunner (runner.runner_class)"),
    Symbol("vllm.model_executor.custom_op", "PluggableLayer.register_oot", params=("name",)),
    Symbol("vllm.model_executor.custom_op", "op_registry_oot"),
    Symbol(f"{_FUSED_MOE}.layer", "FusedMoEFactory", called="runner_cls",
           use="builds each layer's runner (runner_cls)"),
    Symbol(f"{_FUSED_MOE}.runner.moe_runner", "MoERunner._select_forward", when="current_platform.is_cpu()",
           returns=("_moe_forward", "_moe_forward_shared"),
           use="on vLLM-cpu a MoE layer's forward is plain Python, not the opaque vllm::moe_forward op, so dynamo "
               "traces it down to SeqTopKMoERunner._apply_quant_method and the compiled graph calls "
               "seqtopk_cpu::moe_layer (or seqtopk::moe) with each layer's index as a constant: the compiled mode "
               "tests/vllm/test_compute.py verifies"),
    Symbol(f"{_FUSED_MOE}.experts.cpu_moe", "CPUUnquantizedExperts", attrs=("isa", "apply"),
           use="the compiled layer op calls the kernel these experts run on their prepacked weights, with their isa"),
    Symbol(f"{_FUSED_MOE}.experts.cpu_moe", "CPUUnquantizedExperts.apply", called="cpu_fused_moe",
           use="the kernel the compiled layer op calls through the dispatcher (_C::cpu_fused_moe)"),
    Symbol(f"{_FUSED_MOE}.runner.moe_runner", "_moe_forward", called="layer._forward_impl",
           use="the traced forward reaches the runner's _forward_impl, which calls _apply_quant_method"),
    # --- engine configuration
    Symbol("vllm.config", "VllmConfig", attrs=("additional_config", "compilation_config")),
    Symbol("vllm.config", "get_current_vllm_config"),
    Symbol("vllm.config.parallel", "ParallelConfig", attrs=("worker_extension_cls", "pipeline_parallel_size")),
    Symbol("vllm.config.compilation", "CUDAGraphMode",
           attrs=("NONE", "FULL", "PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "mixed_mode")),
    Symbol("vllm.config.compilation", "CompilationConfig",
           attrs=("cudagraph_mode", "splitting_ops", "splitting_ops_contain_attention", "static_forward_context")),
    Symbol(f"{_FUSED_MOE}.runner.moe_runner", "direct_register_custom_op",
           strings=("moe_forward", "moe_forward_shared"),
           use="op names vllm::moe_forward(_shared) that piecewise graphs split around (settings.MOE_OPS)"),
    Symbol("vllm.platforms", "current_platform"),
    Symbol("vllm.platforms.interface", "Platform.is_cpu"),
    Symbol("vllm.utils.cpu_resource_utils", "get_visible_memory_node"),
    Symbol("vllm.utils.cpu_resource_utils", "get_allowed_cpu_list"),
    Symbol("vllm.envs", "environment_variables", strings=("VLLM_MOE_ROUTING_SIMULATION_STRATEGY",)),
    Symbol("vllm.v1.worker.worker_base", "WorkerWrapperBase.__init__", called="resolve_obj_by_qualname",
           use="public extension point: --worker-extension-cls (SeqTopKWorkerExtension)"),
    # --- the router and the MoE layer
    Symbol(f"{_FUSED_MOE}.router.base_router", "BaseRouter", params=("top_k", "global_num_experts", "eplb_state"),
           attrs=("top_k", "routing_method_type", "_compute_routing"),
           abstract=("_compute_routing", "routing_method_type"),
           use="SeqTopKRouter's base class"),
    Symbol(f"{_FUSED_MOE}.router.base_router", "BaseRouter._compute_routing",
           params=("hidden_states", "router_logits", "indices_type", "input_ids"), ordered=True),
    Symbol(f"{_FUSED_MOE}.config", "RoutingMethodType"),
    Symbol(f"{_FUSED_MOE}.config", "FusedMoEConfig", attrs=("hidden_dim", "intermediate_size_per_partition")),
    Symbol(f"{_FUSED_MOE}.runner.moe_runner", "MoERunner",
           attrs=("router", "routed_experts", "shared_experts", "is_monolithic", "moe_config")),
    Symbol(f"{_FUSED_MOE}.runner.shared_experts", "SharedExperts.forward",
           params=("shared_experts_input", "order"), ordered=True, attrs=()),
    Symbol(f"{_FUSED_MOE}.runner.shared_experts", "SharedExperts", attrs=("wait", "output")),
    Symbol(f"{_FUSED_MOE}.runner.shared_experts", "SharedExpertsOrder", attrs=("NO_OVERLAP",)),
    Symbol(f"{_FUSED_MOE}.routed_experts", "RoutedExperts.forward_modular", params=("x", "topk_weights", "topk_ids")),
    Symbol(f"{_FUSED_MOE}.routed_experts", "RoutedExperts",
           attrs=("quant_method", "expert_map", "apply_router_weight_on_input", "activation", "global_num_experts")),
    Symbol(f"{_FUSED_MOE}.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod.create_weights",
           params=("layer",), registers=("w13_weight", "w2_weight"),
           use="the expert weights router.experts_call reads off RoutedExperts and hands CPUUnquantizedExperts.apply"),
    Symbol(f"{_FUSED_MOE}.fused_moe_method_base", "FusedMoEMethodBase",
           attrs=("moe_kernel", "mk_can_overlap_shared_experts")),
    Symbol(f"{_FUSED_MOE}.modular_kernel", "FusedMoEKernel", attrs=("fused_experts",)),
    Symbol(f"{_FUSED_MOE}.experts.cpu_moe", "CPUUnquantizedExperts.apply",
           params=("output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation",
                   "global_num_experts", "expert_map", "a1q_scale", "a2_scale", "workspace13", "workspace2",
                   "expert_tokens_meta", "apply_router_weight_on_input"),
           use="CPU experts called directly (router.experts_call); any mismatch falls back to forward_modular"),
    # --- a GPU step captured in a CUDA graph: unchosen slots as -1 (router.pad_aware_expert_map; not run here)
    Symbol(f"{_FUSED_MOE}.experts.triton_moe", "TritonExperts", attrs=("_lora_context", "apply")),
    Symbol(f"{_FUSED_MOE}.experts.triton_moe", "TritonExperts.apply", params=("topk_ids", "expert_map"),
           called="_prepare_expert_assignment",
           use="drops ids < 0 at alignment when given an expert map (ignore_invalid_experts=skip_invalid)"),
    Symbol(f"{_FUSED_MOE}.experts.triton_moe", "TritonExperts.moe_sum", params=("input", "output", "topk_ids", "expert_map"),
           ordered=True, called="ops.moe_sum",
           use="with an expert map, sums only the slots whose expert is valid: -1 slots add nothing"),
    Symbol(f"{_FUSED_MOE}.modular_kernel", "FusedMoEKernel.apply",
           params=("hidden_states", "w1", "w2", "topk_ids", "topk_weights", "activation", "global_num_experts",
                   "expert_map", "apply_router_weight_on_input"),
           use="router._run_captured calls the layer's modular kernel with the identity map"),
    # --- each step's layout (step.py, stats.py, worker.py)
    Symbol("vllm.forward_context", "get_forward_context"),
    Symbol("vllm.forward_context", "is_forward_context_available"),
    Symbol("vllm.forward_context", "ForwardContext", attrs=("no_compile_layers", "attn_metadata", "batch_descriptor")),
    Symbol("vllm.forward_context", "BatchDescriptor", attrs=("num_reqs", "uniform")),
    Symbol(_RUNNER, "GPUModelRunner",
           attrs=("input_batch", "query_start_loc", "seq_lens", "optimistic_seq_lens_cpu", "device", "vllm_config",
                  "compilation_config", "parallel_config")),
    Symbol("vllm.v1.worker.gpu_input_batch", "InputBatch",
           attrs=("num_reqs", "req_ids", "max_num_reqs", "num_prompt_tokens_cpu_tensor", "block_table")),
    Symbol("vllm.v1.worker.block_table", "MultiGroupBlockTable.__getitem__"),
    Symbol("vllm.v1.worker.block_table", "BlockTable",
           attrs=("block_size", "slot_mapping", "num_blocks_per_row", "get_device_tensor")),
    Symbol("vllm.v1.utils", "CpuGpuBuffer", attrs=("cpu", "gpu")),
    Symbol("vllm.v1.core.sched.output", "SchedulerOutput", attrs=("finished_req_ids",)),
    Symbol("vllm.v1.kv_cache_interface", "FullAttentionSpec", attrs=("block_size", "page_size_bytes")),
    Symbol("vllm.v1.kv_cache_interface", "KVCacheConfig", attrs=("num_blocks", "kv_cache_groups")),
    Symbol("vllm.v1.kv_cache_interface", "KVCacheGroupSpec", attrs=("kv_cache_spec", "layer_names")),
    # --- the API server's engine client (metrics.py) and the offline LLM (tests, evals)
    Symbol("vllm.engine.protocol", "EngineClient.collective_rpc", params=("method", "timeout")),
    Symbol("vllm.v1.engine.async_llm", "AsyncLLM.get_num_unfinished_requests"),
    # --- imported by the sparse embedding heads (seqtopk.sparse.vllm), registered by the same plugin
    Symbol("vllm", "ModelRegistry"),
    Symbol("vllm", "LLM"),
    Symbol("vllm", "SamplingParams"),
    Symbol("vllm", "TokensPrompt"),
    Symbol("vllm.config", "PoolerConfig"),
    Symbol("vllm.model_executor.layers.pooler", "DispatchPooler"),
    Symbol("vllm.model_executor.layers.pooler", "Pooler"),
    Symbol("vllm.model_executor.layers.pooler.tokwise", "TokenPooler"),
    Symbol("vllm.model_executor.layers.pooler.tokwise", "TokenPoolerHead"),
    Symbol("vllm.model_executor.layers.pooler.tokwise", "get_tok_pooling_method"),
    Symbol("vllm.model_executor.layers.pooler.seqwise", "SequencePooler"),
    Symbol("vllm.model_executor.layers.pooler.seqwise", "get_seq_pooling_method"),
    Symbol("vllm.model_executor.layers.pooler.seqwise.heads", "SequencePoolerHead"),
    Symbol("vllm.model_executor.models.bert", "BertEmbeddingModel"),
    Symbol("vllm.model_executor.models.interfaces_base", "default_pooling_type"),
    Symbol("vllm.tasks", "PoolingTask"),
    Symbol("vllm.v1.pool.metadata", "PoolingMetadata"),
    Symbol("vllm.outputs", "PoolingRequestOutput"),
    Symbol("vllm.plugins.io_processors.interface", "IOProcessor"),
    Symbol("vllm.pooling_params", "PoolingParams"),
)
