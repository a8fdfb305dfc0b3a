"""`subspec generate`: the CLI the issue specifies, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import os
import re
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
    """No --config: mode auto serves the default model resident on a CPU, and says why at start; the offload
    preset runs SubSpec (every layer streamed) and produces the same greedy tokens."""
    common = ["--prompt", "Name three primary colors.", "--chat", "--max-tokens", "24", "--max-depth", "8", "--json"]
    auto = run_cli(*common)
    assert auto.returncode == 0, auto.stderr[-2000:]
    out = last_json(auto.stdout)
    assert set(out) >= {"text", "token_ids", "finish_reason", "stats"}
    assert out["finish_reason"] in ("stop", "length") and out["text"] and out["token_ids"]
    assert out["stats"]["mode"] == "resident" and out["stats"]["h2d_bytes"] == 0
    log = auto.stderr
    assert "start-up: mode resident (chosen by mode auto): on a CPU" in log
    assert "start-up: attention: PyTorch's choice per call (no restriction off CUDA)" in log
    for phase in ("fetch", "convert", "load", "place", "quantize"):  # one line per phase, with its time
        assert re.search(rf"start-up: {phase} +\d+\.\d\d s", log), phase
    # The memory plan in device-true words: "cpu", no GPU budget, nothing pinned.
    assert "device total                       cpu" in log and not re.search(r"budget \d", log) and " gpu " not in log
    assert "kernels" not in log  # bitsandbytes' optional-package warning is not the user's concern

    offload = run_cli(*common, "--config", "configs/default-offload.yaml")
    assert offload.returncode == 0, offload.stderr[-2000:]
    streamed = last_json(offload.stdout)
    stats = streamed["stats"]
    for key in ("iterations", "drafted_tokens", "accepted_tokens", "mean_accept_length", "draft_s", "verify_s", "h2d_bytes"):
        assert key in stats
    assert stats["mode"] == "subspec" and stats["drafted_tokens"] > 0 and stats["h2d_bytes"] > 0
    assert "start-up: mode subspec (as configured)" in offload.stderr
    assert re.search(r"start-up: quantize +\d+\.\d\d s  int4 substitutes of 30 streamed layers", offload.stderr)
    assert "streamed decoder layers            host" in offload.stderr and "kernels" not in offload.stderr
    assert streamed["token_ids"] == out["token_ids"]  # lossless: SubSpec greedy == plain greedy


def test_generate_rejects_bad_arguments_clearly() -> None:
    result = run_cli("--prompt", "hi", "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr


def test_generate_in_process_is_lossless_with_cuda_attention_layouts(default_engines, default_tokenizer, request) -> None:
    """`subspec generate`'s path (build_engine, the CLI's chat prompt, Engine.generate) in this process, where
    tests/core's SDPA returns CUDA's output layout: subspec and vanilla give the same greedy tokens (on the
    layout-bound code of before, both modes crashed here, as they would on a GPU). The session's engines of the
    default model, shared with the lossless tests, keep it to seconds."""
    from server.generate_cmd import prompt_token_ids
    from subspec_core.types import GenerationRequest, SamplingParams
    from tests.cuda_layouts import imitating_cuda_layouts

    assert imitating_cuda_layouts() != request.config.getoption("--cpu-sdpa-layout")
    ids = prompt_token_ids(default_tokenizer, "Write a haiku about the sea.", chat=True, system=None)
    request_ = GenerationRequest("cli", tuple(ids), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    tokens = {}
    for mode in ("subspec", "vanilla"):
        events = list(default_engines(mode).generate(request_))
        tokens[mode] = [t for event in events for t in event.token_ids]
        assert events[-1].stats.iterations < 16 if mode == "subspec" else events[-1].stats.iterations == 15
    assert len(tokens["vanilla"]) == 16 and tokens["subspec"] == tokens["vanilla"]
