"""vLLM plugin: SeqTopK routing in `vllm serve` and `vllm.LLM`. Importing this package imports no vLLM.

- plugin.py: the entry point vLLM calls in every process; installs each feature
- settings.py: where a server's settings come from, what they change in the engine configuration
- worker.py: worker-side hooks (router factory, KV-cache set-up), start-up checks, client RPCs
- router.py: the SeqTopK router of one MoE layer and the custom op vLLM's graph calls
- step.py: each step's layout (rows, contexts, slots, fresh and generated tokens) and paged history
- registry.py: the per-process state all of the above share
- stats.py: experts-per-token counters, log lines, traces
"""
