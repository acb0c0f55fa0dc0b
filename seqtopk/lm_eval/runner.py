"""lm-evaluation-harness on SeqTopK models, on either backend: transformers (HF) or vLLM.

Local tasks are YAML files in seqtopk/lm_eval/tasks/ (shipped with the package) whose documents
seqtopk.lm_eval.local_data reads from the shared data, so lm-eval finds them under any include_path.

Why the causal rule by default, on both backends: lm-eval's HF backend right-pads loglikelihood batches and
calls the model without an attention mask, so padding would compete for the budget under the (non-causal)
sequence rule and a document's score would depend on its batch neighbours. Under the causal rule a token's
experts depend only on the tokens before it, so right padding cannot reach them; it is also the honest rule
for LM loss (no information from later tokens), and one default keeps the two backends' scores comparable.
The sequence rule is allowed on HF with batch_size=1, and on vLLM (which does not pad) at any batch size.
"""

from __future__ import annotations

import re
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BACKENDS = ("hf", "vllm")


def local_tasks(tasks_dir: str | Path | None = None) -> list[str]:
    """Names of the tasks in tasks_dir (default: the shipped ones), read off their `task:` lines."""
    names = []
    for yaml_file in sorted(Path(tasks_dir or TASKS_DIR).glob("*.yaml")):
        found = re.search(r"^task:\s*(\S+)", yaml_file.read_text(), re.MULTILINE)
        if found:
            names.append(found.group(1))
    return names


def run_lm_eval(model_path: str, tasks: list[str], settings: dict | None, limit: int | float | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, tasks_dir: str | None = None,
                log_samples: bool = False, device: str = "cpu", backend: str = "hf", stock_k: int | None = None,
                kv_cache_gib: float | None = None) -> dict:
    """Evaluate `model_path` on lm-eval `tasks` (the local ones in seqtopk/lm_eval/tasks included).

    settings: seqtopk.patch keyword arguments, or None for stock TopK: at `stock_k` experts per token when
    given (transformers: seqtopk.topk_at; vLLM: hf_overrides), else at the model's own top_k.
    backend: "hf" (transformers on `device`) or "vllm" (an in-process vllm.LLM; `kv_cache_gib` sizes its KV
    cache, 1 GiB by default on CPU). With SeqTopK on, results["seqtopk"] holds the settings and the routing
    statistics (seqtopk.routing.stats.RoutingStatsSnapshot.as_dict, the same schema on both backends).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import seqtopk

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if settings is not None:
        if stock_k is not None:
            raise ValueError("stock_k is the stock TopK baseline: give it without SeqTopK settings")
        settings = {"prefill": "causal", **settings}
        seqtopk.SeqTopKConfig(**settings)  # validate before loading anything
        if backend == "hf" and settings["prefill"] == "sequence" and batch_size != 1:
            raise ValueError("prefill='sequence' needs batch_size=1 under lm-eval's HF backend: it right-pads "
                             "without an attention mask, so padding would compete for the budget; use "
                             "prefill='causal' (the default here), --batch-size 1, or --backend vllm")
    if stock_k is not None and (isinstance(stock_k, bool) or not isinstance(stock_k, int) or stock_k < 1):
        raise ValueError(f"stock TopK takes a whole number of experts per token >= 1, got {stock_k!r}")
    source = Path(tasks_dir) if tasks_dir else TASKS_DIR
    if not source.is_dir():
        raise FileNotFoundError(f"task directory {source} not found; pass --tasks-dir")
    manager = TaskManager(include_path=str(source))

    def evaluate(lm) -> dict:
        return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                               log_samples=log_samples, bootstrap_iters=0)

    if backend == "vllm":
        from seqtopk.lm_eval.vllm_backend import evaluate_on_vllm

        results, routing = evaluate_on_vllm(model_path, settings, stock_k, batch_size, kv_cache_gib, evaluate)
    else:
        results, routing = _evaluate_on_hf(model_path, settings, stock_k, batch_size, device, evaluate)
    if settings is not None:
        results["seqtopk"] = {"settings": settings, "routing": routing}
    else:
        results["stock_topk"] = {"k": stock_k}  # None: the model's own top_k
    return results


def _evaluate_on_hf(model_path, settings, stock_k, batch_size, device, evaluate) -> tuple[dict, dict | None]:
    """(lm-eval results, routing statistics or None) of the transformers model, patched as asked."""
    import contextlib

    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import seqtopk

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if settings is not None:
        seqtopk.patch(model, **settings)
    routing = seqtopk.topk_at(model, stock_k) if stock_k is not None else contextlib.nullcontext(model)
    with routing:
        results = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device))
    return results, seqtopk.routing_stats(model).as_dict() if settings is not None else None
