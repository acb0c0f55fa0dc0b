"""A real lm-eval run (HF backend) of a patched tiny model on a local task built from ../shared/data."""

import pytest

from seqtopk.lm_eval import run_lm_eval
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
    assert "seqtopk" not in stock
    assert loglikelihoods(stock, "arc_easy_local") != pytest.approx(loglikelihoods(batched, "arc_easy_local"),
                                                                     abs=1e-4)


def test_sequence_rule_with_padded_batches_is_refused(tiny_checkpoint, shared_data):
    with pytest.raises(ValueError, match="batch_size=1"):
        run_lm_eval(str(tiny_checkpoint("qwen3_moe")), ["arc_easy_local"], {"prefill": "sequence"}, limit=2)
