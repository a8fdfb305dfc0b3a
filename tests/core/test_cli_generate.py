"""`subspec generate`: the CLI the issue specifies, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "server", "generate", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_generate_json_contract_and_lossless_modes(default_model_path) -> None:
    common = ["--prompt", "Name three primary colors.", "--chat", "--max-tokens", "24", "--max-depth", "8", "--json"]
    subspec = run_cli(*common)
    assert subspec.returncode == 0, subspec.stderr[-2000:]
    out = last_json(subspec.stdout)
    assert set(out) >= {"text", "token_ids", "finish_reason", "stats"}
    assert out["finish_reason"] in ("stop", "length") and out["text"] and out["token_ids"]
    stats = out["stats"]
    for key in ("iterations", "drafted_tokens", "accepted_tokens", "mean_accept_length", "draft_s", "verify_s", "h2d_bytes"):
        assert key in stats
    assert stats["mode"] == "subspec" and stats["drafted_tokens"] > 0
    assert stats["h2d_bytes"] > 0  # no --config: the default preset streams every layer
    assert "component" in subspec.stderr and "streamed decoder layers" in subspec.stderr  # the memory plan table

    vanilla = run_cli(*common, "--mode", "vanilla")
    assert vanilla.returncode == 0, vanilla.stderr[-2000:]
    assert last_json(vanilla.stdout)["token_ids"] == out["token_ids"]


def test_generate_rejects_bad_arguments_clearly() -> None:
    result = run_cli("--prompt", "hi", "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr
