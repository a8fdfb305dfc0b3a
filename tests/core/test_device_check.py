"""The shared device check (/work/shared/device/device_check.py, not ours) keeps working against this code: its
int4 comparison and its draft-step timing run here on the CPU, through the names and signatures it calls."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

DEVICE_CHECK = Path("/work/shared/device/device_check.py")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def device_check():
    if not DEVICE_CHECK.is_file():
        pytest.skip(f"{DEVICE_CHECK} is not on this machine")
    spec = importlib.util.spec_from_file_location("device_check", DEVICE_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int4_check_finds_the_same_packing(device_check, capsys) -> None:
    device_check.int4_check(CPU)  # CPU against CPU: the code path of the GPU's comparison
    out = capsys.readouterr().out
    assert out.startswith("[int4]") and "same packing" in out


class _Event:
    """torch.cuda.Event on the CPU: enough for the timing's record / synchronize / elapsed_time."""

    def __init__(self, enable_timing: bool = False) -> None:
        pass

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: "_Event") -> float:
        return 1.0


def test_draft_step_timing_runs_its_engine_calls(device_check, capsys, monkeypatch) -> None:
    """Its `benchmarks.synthetic.build_engine(cfg, "subspec", shape, shared, lin, None, dev, torch.bfloat16)`,
    `engine.prompt_logits`, `engine.drafter.grow(...)` / `.graphed` and `engine.close()`, on a tiny stand-in
    for its Qwen2.5-7B shape (the CUDA-only timing calls are stubbed)."""
    import benchmarks.synthetic_weights as synthetic_weights

    monkeypatch.setattr(synthetic_weights, "QWEN25_7B", dataclasses.replace(synthetic_weights.TINY, vocab_size=512))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    device_check.draft_step_timing(CPU, layers=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("[draft] 2-layer") for line in lines), lines
    assert "graphs=True (captured: False)" in lines[0] and "graphs=False (captured: False)" in lines[1]
