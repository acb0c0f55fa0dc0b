"""SeqTopK routing for `vllm serve` and `vllm.LLM`: the one install call the plugin makes.

In every vLLM process this wraps the engine-configuration step (EngineArgs.create_engine_config). When
SeqTopK settings are present there (additional_config or SEQTOPK_CONFIG) they are validated, the engine
arguments adjusted (seqtopk.engines.vllm_settings), and the worker extension named, whose import installs
the worker-side hooks (seqtopk.engines.vllm_worker). Without settings nothing changes.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.seqtopk")  # under "vllm" so it shares vLLM's log handlers


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "seqtopk_wrapped", False):
        return

    def create_engine_config(self, *args, **kwargs):
        from seqtopk.engines.vllm_settings import prepare_engine_args

        prepare_engine_args(self, logger)
        return original(self, *args, **kwargs)

    create_engine_config.seqtopk_wrapped = True
    EngineArgs.create_engine_config = create_engine_config
