"""lm-evaluation-harness on SeqTopK-patched transformers models.

Local tasks are YAML files in seqtopk/lm_eval/tasks/ (shipped with the package) that read ../shared/data;
prepare_task_dir() copies them with that path resolved, so lm-eval finds the data from any working directory.

Why the causal rule by default: lm-eval's HF backend right-pads loglikelihood batches and calls the model
without an attention mask, so padding would compete for the budget under the (non-causal) sequence rule and
a document's score would depend on its batch neighbours. Under the causal rule a token's experts depend only
on the tokens before it, so right padding cannot reach them; it is also the honest rule for LM loss (no
information from later tokens). The sequence rule is allowed with batch_size=1.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from seqtopk.paths import shared_root

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def prepare_task_dir(dest: str | os.PathLike | None = None, tasks_dir: str | os.PathLike | None = None) -> Path:
    """Copy the local task YAMLs to `dest` with `../shared` replaced by the real shared directory and
    `{task_dir}` by `dest`, where the documents of tasks built from a shared text are written."""
    source = Path(tasks_dir) if tasks_dir else TASKS_DIR
    if not source.is_dir():
        raise FileNotFoundError(f"task directory {source} not found; pass --tasks-dir")
    out = Path(dest) if dest else Path(tempfile.mkdtemp(prefix="seqtopk-tasks-"))
    out.mkdir(parents=True, exist_ok=True)
    root = str(shared_root().resolve())
    for yaml_file in sorted(source.glob("*.yaml")):
        (out / yaml_file.name).write_text(yaml_file.read_text().replace("../shared", root).replace("{task_dir}", str(out)))
    text = shared_root() / "data" / "tinyshakespeare" / "input.txt"
    if text.is_file():
        write_held_out_speeches(text.read_text(), out / "tinyshakespeare_heldout.jsonl")
    return out


def write_held_out_speeches(text: str, path: Path) -> int:
    """The last 10% of the text (what the demo model never trained on), one JSON document per speech (blocks
    between blank lines); returns how many."""
    import json

    held_out = text[int(len(text) * 0.9):]
    speeches = [s.strip("\n") for s in held_out.split("\n\n") if s.strip()]
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    return len(speeches)


def run_lm_eval(model_path: str, tasks: list[str], settings: dict | None, limit: int | float | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, tasks_dir: str | None = None,
                log_samples: bool = False, device: str = "cpu") -> dict:
    """Evaluate `model_path` on lm-eval `tasks` (the local ones in seqtopk/lm_eval/tasks included).

    settings: seqtopk.patch keyword arguments, or None for the model's stock routing.
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import seqtopk

    if settings is not None:
        settings = {"prefill": "causal", **settings}
        seqtopk.SeqTopKConfig(**settings)  # validate before loading anything
        if settings["prefill"] == "sequence" and batch_size != 1:
            raise ValueError("prefill='sequence' needs batch_size=1 under lm-eval: its HF backend right-pads "
                             "without an attention mask, so padding would compete for the budget; use "
                             "prefill='causal' (the default here) or --batch-size 1")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if settings is not None:
        seqtopk.patch(model, **settings)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(prepare_task_dir(tasks_dir=tasks_dir)))
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                              log_samples=log_samples, bootstrap_iters=0)
    if settings is not None:
        results["seqtopk"] = {"settings": settings, "routing": seqtopk.routing_stats(model).as_dict()}
    return results
