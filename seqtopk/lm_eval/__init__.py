"""lm-evaluation-harness on SeqTopK-patched transformers models, with local tasks shipped in tasks/.

`run_lm_eval` and `prepare_task_dir` live in runner.py; tasks/*.yaml ship inside the package (package
data), so an installed wheel finds them as well as a checkout.
"""

from seqtopk.lm_eval.runner import TASKS_DIR, prepare_task_dir, run_lm_eval

__all__ = ["TASKS_DIR", "prepare_task_dir", "run_lm_eval"]
