"""Engine adapters, one subpackage each, kept thin: they recover each step's sequence structure and call
seqtopk.routing.router.route. `hf/` patches transformers models; `vllm/` is the vLLM plugin."""
