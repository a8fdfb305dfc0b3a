"""Running servers for tests: an app in a uvicorn thread (fake engines), or `subspec serve` in a
subprocess (the real model through the real worker process)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[2]


def scrape_metrics(http: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics as {'name{labels}': value}."""
    values = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_for(condition: Any, timeout: float = 10, what: str = "condition", poll_s: float = 0.01) -> float:
    """Poll `condition` until it holds; fail naming `what` after `timeout` s. Returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(poll_s)
    return time.monotonic() - started


def post_in_thread(url: str, body: dict, results: dict, key: str, timeout: float = 60) -> threading.Thread:
    """POST `body` to `url` on a thread of its own (a concurrent client); its response lands in `results[key]`."""
    thread = threading.Thread(target=lambda: results.__setitem__(key, httpx.post(url, json=body, timeout=timeout)))
    thread.start()
    return thread


def long_chat(content: str, max_tokens: int) -> dict:
    """A chat body that generates exactly `max_tokens` tokens (ignore_eos): a request that runs as long as asked."""
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UvicornThread:
    """A FastAPI app served by uvicorn on a loopback port, in a background thread.

    With `settings`, it is served as `subspec serve` serves it (server.serve.uvicorn_config: the timed h11
    protocol, the draining server); `self.server.handle_exit(signal.SIGTERM, None)` then does what the
    signal would (signal handlers only exist in the main thread)."""

    def __init__(self, app: Any, *, settings: Any = None) -> None:
        self.app = app
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        if settings is None:
            self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                        timeout_graceful_shutdown=2))
        else:
            from server.serve import uvicorn_config
            from server.edge.shutdown import DrainingServer

            config = uvicorn_config(app, dataclasses.replace(settings, host="127.0.0.1", port=self.port,
                                                             log_level="warning"))
            self.server = DrainingServer(config, shutdown=app.state.shutdown)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_healthy(self.base_url, timeout)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_healthy(base_url: str, timeout: float, process: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
            last = response.json()
            if response.status_code == 200:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not healthy after {timeout} s: {last}")


class ServeProcess:
    """`python -m server serve ...` in a subprocess, logging to a file."""

    def __init__(self, tmp_dir: Path, name: str, config: dict[str, Any], *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_dir / f"{name}.yaml"
        self.config_path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = tmp_dir / f"{name}.log"
        self.args = ["--config", str(self.config_path), "--port", str(self.port), *args]
        # The test's own SUBSPEC_* settings must not leak in; only where the default model is cached may.
        keep = ("SUBSPEC_CACHE_DIR", "SUBSPEC_DEFAULT_MODEL_PATH")
        base = {k: v for k, v in os.environ.items() if not k.startswith("SUBSPEC_") or k in keep}
        # One intra-op thread: on a small shared CPU machine, two OpenMP threads that spin-wait on each
        # other slow every engine step down 10x as soon as anything else (the API process, another
        # test run) takes a core. A run with the machine to itself is barely slower with one.
        self.env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> ServeProcess:
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "server", "serve", *self.args], cwd=REPO_ROOT,
                                        stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_healthy(self.base_url, timeout, self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"server failed to start; log:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if hasattr(self, "_log"):
            self._log.close()
