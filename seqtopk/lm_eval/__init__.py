"""lm-evaluation-harness on SeqTopK models (transformers or vLLM), with local tasks shipped in tasks/.

`run_lm_eval` lives in runner.py (the vLLM backend in vllm_backend.py); tasks/*.yaml ship inside the package
(package data) and read their documents through local_data.py, so an installed wheel finds them as well as a
checkout, under `seqtopk lm-eval` or plain `lm_eval --include_path`.
"""

from seqtopk.lm_eval.runner import TASKS_DIR, local_tasks, run_lm_eval

__all__ = ["TASKS_DIR", "local_tasks", "run_lm_eval"]
