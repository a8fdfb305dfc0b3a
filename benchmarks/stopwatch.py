"""Timing a callable on a device: CUDA events on the current stream, perf_counter on the CPU.

For the synthetic mechanics, where each timed call is one or a few whole forwards: the events bracket
the call on the compute stream (copy-stream work it waits on included), and only the last is synchronised.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the minimum of the repeats, and every sample."""

    median_s: float
    min_s: float
    samples_s: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def time_call(fn: Callable[[], Any], *, device: torch.device, repeats: int) -> Timing:
    """Run `fn` `repeats` times back to back and time each call (warm it up before calling this)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        marks = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            marks.append((start, end))
        marks[-1][1].synchronize()
        samples = [start.elapsed_time(end) / 1e3 for start, end in marks]
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start_s)
    return Timing(median_s=statistics.median(samples), min_s=min(samples), samples_s=samples)
