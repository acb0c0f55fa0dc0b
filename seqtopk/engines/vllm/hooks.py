"""Every change SeqTopK makes to vLLM at run time, installed from this one module. Each is idempotent and changes
nothing for an engine that runs without SeqTopK settings.

In the process that builds the engine configuration (API server or `vllm.LLM`), by the plugin's entry point
(seqtopk.engines.vllm.plugin -> `install_engine_hooks`):
1. EngineArgs.create_engine_config: validate the settings and adjust the engine arguments
   (seqtopk.engines.vllm.settings.prepare_engine_args); then hook 2, and on GPUs keep CUDA graphs on
   (settings.keep_cuda_graphs);
2. the API server's init_app_state: start the /metrics poller (seqtopk.engines.vllm.metrics).

In each worker, when vLLM imports the worker extension the settings named (seqtopk.engines.vllm.worker ->
`install_worker_hooks`; vLLM offers no other hook that runs there before the model is built):
3. create_fused_moe_router: each MoE layer gets a SeqTopK router (seqtopk.engines.vllm.router);
4. the MoERunner class, through vLLM's public out-of-tree layer registry (no patch): a SeqTopK layer's router +
   experts call runs as one op (seqtopk.engines.vllm.runner);
5. GPUModelRunner._prepare_inputs: the batch rows' prompt lengths and decode bands reach the device
   (seqtopk.engines.vllm.forward.refresh_step_rows);
6. GPUModelRunner._model_forward: the step's layout is handed to the compiled layers once per forward, and
   the records kept after it (forward.set_whole_layer_step / after_whole_layer_step);
7. GPUModelRunner.initialize_kv_cache: every MoE layer is checked and gets its paged routing state
   (seqtopk.engines.vllm.startup.attach_state).
"""

from __future__ import annotations

import sys


def _wrap(owner, name: str, make) -> None:
    """Replace owner.name by make(original), once (a wrapper carries `seqtopk_wrapped`)."""
    original = getattr(owner, name)
    if getattr(original, "seqtopk_wrapped", False):
        return
    wrapper = make(original)
    wrapper.seqtopk_wrapped = True
    setattr(owner, name, wrapper)


def install_engine_hooks() -> None:
    """Hook 1 (hook 2 follows once a server's settings are validated)."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            from seqtopk.engines.vllm import settings

            config = settings.prepare_engine_args(self, settings.logger)
            vllm_config = original(self, *args, **kwargs)
            if config is not None:
                from vllm.platforms import current_platform

                install_metrics_hook()  # the API server's entry module is loaded by now, if this process serves HTTP
                if not current_platform.is_cpu():
                    settings.keep_cuda_graphs(vllm_config.compilation_config, settings.logger)
            return vllm_config

        return create_engine_config

    _wrap(EngineArgs, "create_engine_config", make)


def install_metrics_hook() -> None:
    """Hook 2: nothing happens in a process that serves no HTTP."""
    from seqtopk.engines.vllm import metrics

    entry = sys.modules.get(metrics.ENTRY)
    if entry is not None:
        _wrap(entry, "init_app_state", metrics.start_polling)


def install_worker_hooks() -> None:
    """Hooks 3 to 7."""
    import vllm.model_executor.layers.fused_moe.layer as fused_moe_layer
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from seqtopk.engines.vllm import forward, startup
    from seqtopk.engines.vllm.router import wrap_router_factory
    from seqtopk.engines.vllm.runner import runner_class

    _wrap(fused_moe_layer, "create_fused_moe_router", wrap_router_factory)
    current = op_registry_oot.get("MoERunner")
    if current is None:
        PluggableLayer.register_oot(runner_class(), name="MoERunner")
    elif not getattr(current, "seqtopk_runner", False):
        raise RuntimeError(f"another vLLM plugin replaced vLLM's MoERunner ({current.__module__}."
                           f"{current.__qualname__}); SeqTopK cannot run beside it")

    def prepare_inputs(original):
        def _prepare_inputs(self, scheduler_output, *args, **kwargs):
            out = original(self, scheduler_output, *args, **kwargs)
            forward.refresh_step_rows(self, scheduler_output)
            return out

        return _prepare_inputs

    def model_forward(original):
        def _model_forward(self, *args, **kwargs):
            return forward.around_forward(self, original, args, kwargs)

        return _model_forward

    def initialize_kv_cache(original):
        def _initialize_kv_cache(self, kv_cache_config, is_profiling=False, *args, **kwargs):
            original(self, kv_cache_config, is_profiling, *args, **kwargs)
            startup.attach_state(self, kv_cache_config, log=not is_profiling)

        return _initialize_kv_cache

    _wrap(GPUModelRunner, "_prepare_inputs", prepare_inputs)
    _wrap(GPUModelRunner, "_model_forward", model_forward)
    _wrap(GPUModelRunner, "initialize_kv_cache", initialize_kv_cache)
