"""vLLM plugin: SeqTopK routing in `vllm serve` and `vllm.LLM`. Importing this package imports no vLLM.

- plugin.py: the entry point vLLM calls in every process; installs each feature
- hooks.py: every change SeqTopK makes to vLLM at run time, installed from this one place
- settings.py: where a server's settings come from, what they change in the engine configuration
- worker.py: the worker extension (client RPCs); its import installs the worker-side hooks
- startup.py: the checks and the paged routing state set up with the KV cache
- runner.py: the MoE runner that runs a SeqTopK layer as one op
- forward.py: around each model forward (the rows refreshed, the step handed to the compiled layers)
- router.py: the SeqTopK router of one MoE layer and the Python op vLLM's graph calls where nothing is compiled
- step.py: each step's layout (rows, contexts, slots, fresh and generated tokens) and paged history
- registry.py: the per-process state all of the above share
- stats.py: experts-per-token counters, log lines, traces
"""
