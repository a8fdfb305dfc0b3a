"""The start-up report (subspec_core/startup.py): phase lines, the warm-up, the third-party warning filter."""

from __future__ import annotations

import logging
import re

import pytest

from subspec_core.startup import StartupLog, quiet_third_party_warnings, warm_up
from subspec_core.types import TokenEvent


def test_one_line_per_phase_with_its_time():
    lines: list[str] = []
    phases = StartupLog(emit=lines.append)
    with phases.phase("load") as phase:
        phase.detail = "30 layers"
    phases.skipped("quantize", "mode resident has no draft")
    phases.note("mode resident (chosen by mode auto): why")
    with pytest.raises(RuntimeError), phases.phase("convert"):
        raise RuntimeError("a failed phase reports nothing: the error says it")
    assert re.fullmatch(r"start-up: load +\d+\.\d\d s  30 layers", lines[0])
    assert lines[1:] == ["start-up: quantize    0.00 s  skipped: mode resident has no draft",
                         "start-up: mode resident (chosen by mode auto): why"]
    assert [p.name for p in phases.phases] == ["load", "quantize"] and phases.elapsed_s >= 0


def test_a_phase_timed_by_the_caller_reads_like_the_others():
    """Placing and quantizing interleave layer by layer; each is still reported as its own timed phase."""
    lines: list[str] = []
    phases = StartupLog(emit=lines.append)
    phases.record("place", 1.234, "24 layers read once")
    phases.record("quantize", 5.0, "nf4 substitutes of 24 streamed layers")
    assert lines == ["start-up: place       1.23 s  24 layers read once",
                     "start-up: quantize    5.00 s  nf4 substitutes of 24 streamed layers"]
    assert [(p.name, p.seconds) for p in phases.phases] == [("place", 1.234), ("quantize", 5.0)]


class _RecordingEngine:
    """Stands in for Engine in `warm_up`: records the request and whether its generator was closed."""

    max_model_len = 64

    class tokenizer:  # noqa: N801 - a namespace standing in for a tokenizer object
        @staticmethod
        def encode(text: str, add_special_tokens: bool = True) -> list[int]:
            return [1, 2, 3]

    def __init__(self) -> None:
        self.requests: list = []
        self.steps = 0
        self.closed = False

    def generate(self, request):
        self.requests.append(request)
        try:
            for _ in range(100):
                self.steps += 1
                yield TokenEvent(request.request_id, (5,), "x")
        finally:
            self.closed = True


def test_warm_up_runs_one_prefill_and_one_full_depth_decode_step():
    engine = _RecordingEngine()
    assert warm_up(engine) == "1 prefill + 1 decode step"
    [request] = engine.requests
    assert engine.steps == 2 and engine.closed  # stopped after the first decode step
    # max_tokens up to the context, so the engine's first tree is as deep as configured
    assert request.sampling.max_tokens == 64 - 3 and request.sampling.greedy and request.sampling.ignore_eos


def test_bitsandbytes_kernels_warning_is_dropped_and_other_records_kept():
    quiet_third_party_warnings()
    quiet_third_party_warnings()  # idempotent
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    noise = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "Failed to load CPU gemm_4bit_forward "
                              "from kernels-community: %s. Please make sure you already `pip install kernels`",
                              ("No module named 'kernels'",), None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something else", (), None)
    assert not logger.filter(noise) and logger.filter(other)


def test_huggingface_hub_lines_are_printed_once():
    """The hub's logger has a handler of its own: propagating to the root's too would print each line twice."""
    quiet_third_party_warnings()
    assert logging.getLogger("huggingface_hub").propagate is False
