"""A real lm-eval run (HF backend) of a patched tiny model on a local task built from ../shared/data; the
shipped task YAMLs under a plain include_path; the command's help."""

import pytest

from seqtopk.lm_eval import TASKS_DIR, local_tasks, run_lm_eval
from tests.lm_eval_checks import accuracy_from_samples


def loglikelihoods(results, task):
    return [float(r[0]) for s in results["samples"][task] for r in s["filtered_resps"]]


def test_lm_eval_arc_easy_on_patched_model(tiny_checkpoint, shared_data):
    model = str(tiny_checkpoint("qwen3_moe"))
    batched = run_lm_eval(model, ["arc_easy_local"], {"cap": 4}, limit=12, batch_size=4, log_samples=True)
    metrics = batched["results"]["arc_easy_local"]
    assert metrics["acc,none"] == pytest.approx(accuracy_from_samples(batched, "arc_easy_local"))
    assert len(batched["samples"]["arc_easy_local"]) == 12
    routing = batched["seqtopk"]["routing"]
    assert routing["tokens"][0] > 0 and batched["seqtopk"]["settings"]["prefill"] == "causal"
    # lm-eval right-pads without a mask; under the causal rule a document's scores ignore its neighbours.
    single = run_lm_eval(model, ["arc_easy_local"], {"cap": 4}, limit=12, batch_size=1, log_samples=True)
    assert loglikelihoods(batched, "arc_easy_local") == pytest.approx(loglikelihoods(single, "arc_easy_local"),
                                                                       abs=1e-4)
    stock = run_lm_eval(model, ["arc_easy_local"], None, limit=12, batch_size=4, log_samples=True)
    assert "seqtopk" not in stock and stock["stock_topk"] == {"k": None}
    assert loglikelihoods(stock, "arc_easy_local") != pytest.approx(loglikelihoods(batched, "arc_easy_local"),
                                                                     abs=1e-4)
    # The stock baseline at a reduced k (seqtopk.topk_at, which routes as the checkpoint loaded with that top_k).
    top1 = run_lm_eval(model, ["arc_easy_local"], None, limit=12, batch_size=4, log_samples=True, stock_k=1)
    assert top1["stock_topk"] == {"k": 1} and "seqtopk" not in top1
    assert loglikelihoods(top1, "arc_easy_local") != pytest.approx(loglikelihoods(stock, "arc_easy_local"), abs=1e-4)


def test_sequence_rule_with_padded_batches_is_refused(tiny_checkpoint, shared_data):
    with pytest.raises(ValueError, match="batch_size=1"):
        run_lm_eval(str(tiny_checkpoint("qwen3_moe")), ["arc_easy_local"], {"prefill": "sequence"}, limit=2)


def test_shipped_tasks_load_under_a_plain_include_path(shared_data, tmp_path, monkeypatch):
    """What `lm_eval --include_path seqtopk/lm_eval/tasks` does, from another directory: every local task
    finds its documents (the YAMLs name seqtopk.lm_eval.local_data as their custom_dataset)."""
    from lm_eval.tasks import TaskManager

    from seqtopk.lm_eval.local_data import held_out_speeches

    monkeypatch.chdir(tmp_path)
    tasks = TaskManager(include_path=str(TASKS_DIR), metadata={"pretrained": "x"}).load(local_tasks())["tasks"]
    sizes = {name: len(task.test_docs()) for name, task in tasks.items()}
    speeches = held_out_speeches((shared_data / "tinyshakespeare" / "input.txt").read_text())
    assert sizes == {"arc_challenge_local": 1172, "arc_easy_local": 2376, "lambada_openai_local": 5153,
                     "tinyshakespeare_local": len(speeches)}
    assert tasks["tinyshakespeare_local"].test_docs()[5]["text"] == speeches[5]


def test_help_lists_the_local_tasks(capsys):
    from seqtopk.cli import main

    names = local_tasks()
    assert "tinyshakespeare_local" in names and len(names) == len(list(TASKS_DIR.glob("*.yaml")))
    with pytest.raises(SystemExit):
        main(["lm-eval", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(name in shown for name in names) and "--backend {hf,vllm}" in shown
