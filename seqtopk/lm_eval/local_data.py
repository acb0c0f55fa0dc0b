"""The documents of the local tasks (tasks/*.yaml), read from the shared data wherever lm-eval runs.

Each task YAML names one of these functions as its `custom_dataset` (`!function
seqtopk.lm_eval.local_data.<name>`), so the shipped YAMLs work under any `--include_path` without being
rewritten: plain `lm_eval --include_path .../seqtopk/lm_eval/tasks` as well as `seqtopk lm-eval`. The data
comes from seqtopk.paths.shared_root() ($SEQTOPK_SHARED, or ../shared). lm-eval calls the function with the
task's metadata and its dataset_kwargs as keywords, and the run's model arguments; those we do not name
are ignored.
"""

from __future__ import annotations

import json

from seqtopk.paths import shared_path

HELD_OUT_FRACTION = 0.1  # the demo model and evals/repro_tiny_finetune.py train on the first 90%


def shared_jsonl(shared_file: str, **_) -> dict:
    """{"test": the rows of shared/<shared_file>} (one JSON object a line)."""
    import datasets

    path = shared_path(*shared_file.split("/"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_read_jsonl(path))})


def tinyshakespeare_heldout(**_) -> dict:
    """{"test": one document per speech of the held-out tinyshakespeare text}."""
    import datasets

    text = shared_path("data", "tinyshakespeare", "input.txt").read_text()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"text": speech} for speech in held_out_speeches(text)])})


def held_out_speeches(text: str) -> list[str]:
    """The last 10% of the text (what the demo model never trained on), split into speeches (blocks between
    blank lines)."""
    held_out = text[int(len(text) * (1 - HELD_OUT_FRACTION)):]
    return [s.strip("\n") for s in held_out.split("\n\n") if s.strip()]


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
