"""A start-up that explains itself: one line per phase with its duration, the engine warm-up, and a filter
for a third-party warning that does not concern the user.

    start-up: fetch       0.00 s  /root/.cache/subspec/models/SmolLM2-135M-Instruct.Q4_1.gguf (verified)
    start-up: convert     0.00 s  cached: /root/.cache/subspec/models/converted/...
    start-up: load        1.92 s  SmolLM2-135M-Instruct: llama, 30 layers, float32
    start-up: mode resident (chosen by mode auto): on a CPU the weights already sit in ...
    start-up: place       0.21 s  30 resident on cpu, 0 streamed
    start-up: quantize    0.00 s  skipped: mode resident has no draft
    start-up: warm up     0.35 s  1 prefill + 1 decode step
    start-up: ready in 2.6 s
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

PREFIX = "start-up: "


@dataclass
class Phase:
    """One start-up phase; the code inside `StartupLog.phase` sets `detail` to say what it did."""

    name: str
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{PREFIX}{self.name:<9} {self.seconds:6.2f} s  {self.detail}".rstrip()


class StartupLog:
    """Times start-up phases and emits one line per phase (to `emit`, by default this module's logger)."""

    def __init__(self, emit: Callable[[str], None] | None = None) -> None:
        self._emit = emit if emit is not None else log.info
        self._started = time.perf_counter()
        self.phases: list[Phase] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Time the block; its line is emitted when the block ends without an exception."""
        phase = Phase(name)
        started = time.perf_counter()
        yield phase
        phase.seconds = time.perf_counter() - started
        self.phases.append(phase)
        self._emit(phase.line())

    def record(self, name: str, seconds: float, detail: str) -> None:
        """A phase timed by the caller (work interleaved with another phase's, e.g. quantizing while placing)."""
        phase = Phase(name, detail, seconds)
        self.phases.append(phase)
        self._emit(phase.line())

    def skipped(self, name: str, why: str) -> None:
        """A phase this start does not need, still listed so every start shows the same phases."""
        phase = Phase(name, f"skipped: {why}")
        self.phases.append(phase)
        self._emit(phase.line())

    def note(self, text: str) -> None:
        """A line that is not a timed phase (the chosen mode, the total)."""
        self._emit(f"{PREFIX}{text}")

    @property
    def elapsed_s(self) -> float:
        """Seconds since this log was created."""
        return time.perf_counter() - self._started


def warm_up(engine: Any, *, prompt_text: str = "Hello") -> str:
    """Run one prefill and one decode step (a full-depth draft tree in mode subspec), so the first request
    does not pay first-call costs (kernel selection, allocator growth, bitsandbytes set-up). Returns a
    short description for the start-up line."""
    from subspec_core.types import GenerationRequest, SamplingParams

    ids = list(engine.tokenizer.encode(prompt_text, add_special_tokens=True))[: max(engine.max_model_len - 2, 1)]
    # max_tokens up to the context: the first decode step then drafts a tree of the full configured depth.
    request = GenerationRequest("warm-up", tuple(ids or [0]), SamplingParams(
        max_tokens=max(engine.max_model_len - len(ids or [0]), 1), temperature=0.0, ignore_eos=True))
    events = engine.generate(request)
    steps = 0
    try:
        for event in events:
            steps += 1
            if event.finished or steps == 2:
                break
    finally:
        events.close()
    return f"1 prefill + {steps - 1} decode step" if steps else "nothing to run"


# bitsandbytes (>= 0.48) looks for an optional faster CPU 4-bit kernel in the `kernels` package when it is
# imported on a CPU with AVX512-BF16, and warns when that package is missing. It then uses its own built-in
# kernel, which is what our draft was measured with: the warning asks the user to install something they
# do not need, so it is dropped (and said once at debug level).
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_MESSAGE = "from kernels-community"


class _DropBitsandbytesKernelsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _BNB_KERNELS_MESSAGE in record.getMessage():
            log.debug("bitsandbytes: the optional `kernels` package is not installed; its built-in CPU 4-bit "
                      "kernel is used (this is expected)")
            return False
        return True


def quiet_third_party_warnings() -> None:
    """Install the filter above, and print huggingface_hub's lines once (call it where the process configures
    logging; calling it again changes nothing)."""
    from huggingface_hub.utils import logging as hub_logging

    target = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropBitsandbytesKernelsWarning) for f in target.filters):
        target.addFilter(_DropBitsandbytesKernelsWarning())
    # huggingface_hub's logger has a stderr handler of its own and also propagates to the root logger's:
    # every hub line (a download retry, a warning) would be printed twice.
    hub_logging.disable_propagation()
