"""docker/entrypoint.sh turns SUBSPEC_* variables into a `subspec serve` command line.

A fake `subspec` first on PATH prints its argv, one argument a line, so the test reads exactly
what the container would run. The script is run by dash (/bin/sh) and bash alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh"
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
