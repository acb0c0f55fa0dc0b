"""SeqTopK inside a vLLM worker process: the worker extension and the calls clients can make.

When SeqTopK is on, the engine configuration names `SeqTopKWorkerExtension` as vLLM's worker extension
(`--worker-extension-cls`). vLLM imports this module in each worker before it builds the model, and the import
installs the worker-side hooks (seqtopk.engines.vllm.hooks, hooks 3 to 7: the router factory, the MoE runner,
the step's rows, the model forward, the KV-cache set-up). The extension adds `seqtopk_stats`, `seqtopk_trace`
and `seqtopk_band_counters` for `LLM.collective_rpc`.
"""

from __future__ import annotations

from seqtopk.engines.vllm.hooks import install_worker_hooks


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


# Installed at import, not by a call: vLLM imports the worker-extension module (named by the settings) in
# each worker before it builds the model, and offers no other hook that runs there at that time.
install_worker_hooks()
