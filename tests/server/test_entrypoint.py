"""docker/entrypoint.sh turns SUBSPEC_* variables into a `subspec serve` command line and tells
docker/healthcheck.py the port served.

A fake `subspec` first on PATH prints its argv, one argument a line, so the test reads exactly
what the container would run. The script is run by dash (/bin/sh) and bash alike. (test_container.py runs
the real server through it, as the image does.)
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh"
HEALTHCHECK = ENTRYPOINT.with_name("healthcheck.py")
SHELLS = [s for s in ("sh", "bash") if shutil.which(s)]


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "subspec"
    fake.write_text('#!/bin/sh\necho "subspec"\nfor arg in "$@"; do echo "$arg"; done\n')
    fake.chmod(0o755)
    return bin_dir


def run_entrypoint(fake_bin: Path, shell: str, env: dict[str, str], *args: str) -> list[str]:
    """The argv the entry point ends up exec'ing."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SUBSPEC_") and k != "PORT"}
    base["PATH"] = f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    base["SUBSPEC_PORT_FILE"] = str(fake_bin.parent / "subspec.port")
    result = subprocess.run(
        [shell, str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.splitlines()


def test_entrypoint_is_executable():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")


@pytest.mark.parametrize("shell", SHELLS)
def test_defaults(fake_bin, shell):
    assert run_entrypoint(fake_bin, shell, {}) == [
        "subspec", "serve", "--host", "0.0.0.0", "--port", "8000", "--config", "/app/configs/default.yaml",
    ]


@pytest.mark.parametrize("shell", SHELLS)
def test_all_variables(fake_bin, shell):
    env = {
        "PORT": "9001",
        "SUBSPEC_CONFIG": "/app/configs/qwen2.5-7b-instruct-8gb.yaml",
        "SUBSPEC_MODEL": "/models/my model.gguf",
        "SUBSPEC_API_KEY": "sk-test $HOME; echo pwned",
        "SUBSPEC_MAX_QUEUE": "16",
    }
    assert run_entrypoint(fake_bin, shell, env) == [
        "subspec", "serve", "--host", "0.0.0.0", "--port", "9001",
        "--config", "/app/configs/qwen2.5-7b-instruct-8gb.yaml",
        "--model", "/models/my model.gguf",  # spaces survive as one argument
        "--max-queue", "16",
    ]  # no --api-key: the key stays in the environment, out of ps


def test_the_api_key_reaches_the_server_through_the_environment_only(fake_bin):
    """`ps` shows every argument: the key must stay in SUBSPEC_API_KEY, which the server reads."""
    fake = fake_bin / "subspec"
    fake.write_text('#!/bin/sh\necho "argv=$*"\necho "key=${SUBSPEC_API_KEY-unset}"\n')
    key = "sk-test $HOME; echo pwned"
    argv, env_key = run_entrypoint(fake_bin, "sh", {"SUBSPEC_API_KEY": key})
    assert key not in argv and "--api-key" not in argv
    assert env_key == f"key={key}"  # unchanged: no word splitting or expansion
    assert run_entrypoint(fake_bin, "sh", {"SUBSPEC_API_KEY": ""})[1] == "key=unset"


@pytest.mark.parametrize("shell", SHELLS)
def test_empty_variables_mean_unset(fake_bin, shell):
    env = {"SUBSPEC_CONFIG": "", "SUBSPEC_MODEL": "", "SUBSPEC_API_KEY": "", "PORT": ""}
    assert run_entrypoint(fake_bin, shell, env) == ["subspec", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_empty_engine_variables_are_not_passed_on(fake_bin, tmp_path):
    """SUBSPEC_MODEL= would reach the engine's env overrides as model null: the entry point unsets it."""
    fake = fake_bin / "subspec"
    fake.write_text('#!/bin/sh\necho "model=${SUBSPEC_MODEL-unset}"\n')
    assert run_entrypoint(fake_bin, "sh", {"SUBSPEC_MODEL": ""}) == ["model=unset"]
    assert run_entrypoint(fake_bin, "sh", {"SUBSPEC_MODEL": "gpt2"}) == ["model=gpt2"]


@pytest.mark.parametrize("shell", SHELLS)
def test_extra_arguments_come_last(fake_bin, shell):
    argv = run_entrypoint(fake_bin, shell, {"SUBSPEC_MODEL": "Qwen/Qwen2.5-7B-Instruct"}, "--max-queue", "4", "--port", "9")
    assert argv == [
        "subspec", "serve", "--host", "0.0.0.0", "--port", "8000", "--config", "/app/configs/default.yaml",
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--max-queue", "4", "--port", "9",
    ]
    assert run_entrypoint(fake_bin, shell, {}, "serve", "--port", "9")[-2:] == ["--port", "9"]


@pytest.mark.parametrize("shell", SHELLS)
def test_other_commands_run_as_given(fake_bin, shell):
    assert run_entrypoint(fake_bin, shell, {"SUBSPEC_MODEL": "x"}, "subspec", "--help") == ["subspec", "--help"]
    assert run_entrypoint(fake_bin, shell, {}, "echo", "hello world") == ["hello world"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("env, args, port", [
    ({}, (), "8000"), ({"PORT": "9001"}, (), "9001"), ({}, ("--port", "9000"), "9000"),
    ({"PORT": "9001"}, ("--port=9002",), "9002"), ({}, ("--port", "9000", "--max-queue", "4", "--port", "9003"), "9003"),
])
def test_the_served_port_is_written_for_the_health_check(fake_bin, shell, env, args, port):
    """`docker run IMAGE --port 9000` serves on 9000: the health check must ask there, not at $PORT."""
    run_entrypoint(fake_bin, shell, env, *args)
    assert (fake_bin.parent / "subspec.port").read_text() == port + "\n"


@pytest.fixture
def health_server() -> Iterator[tuple[int, dict]]:
    """A stand-in /health on a loopback port; set `answer["status"]` and `answer["code"]`."""
    answer = {"code": 200, "status": "ok"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": answer["status"]}).encode()
            self.send_response(answer["code"] if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], answer
    server.shutdown()
    server.server_close()


def test_health_check_ready_and_live(health_server, tmp_path, monkeypatch):
    """Docker's HEALTHCHECK passes on 200 only; `--live` (a Kubernetes liveness probe) also passes a 503 from a
    server at work (loading, restarting, stalled, draining), and fails a `failed` one or no answer."""
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    port, answer = health_server
    (tmp_path / "port").write_text(f"{port}\n")
    monkeypatch.setenv("SUBSPEC_PORT_FILE", str(tmp_path / "port"))
    monkeypatch.setenv("PORT", "1")  # the file wins
    assert healthcheck.main([]) == 0 and healthcheck.main(["--live"]) == 0
    for status in ("loading", "restarting", "stalled", "draining"):
        answer.update(code=503, status=status)
        assert healthcheck.main([]) == 1 and healthcheck.main(["--live"]) == 0, status
    answer.update(code=503, status="failed")
    assert healthcheck.main(["--live"]) == 1
    (tmp_path / "port").write_text("1\n")  # nothing listens there
    assert healthcheck.main(["--live"]) == 1
