"""Device time without a host synchronisation: CUDA events on the current stream, perf_counter on the CPU.

A mark costs no sync. A duration is read only once something has waited for its later mark (the engine reads
its marks after the step's one host sync), so timing never stalls the pipeline.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class Stopwatch:
    """Marks points on a device's current stream and measures the seconds between two of them."""

    def __init__(self, device: torch.device) -> None:
        self.on_cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A point on the current stream (a recorded CUDA event), or the host clock on the CPU."""
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def wait(self, mark: Any) -> None:
        """Block the host until the device has reached `mark` (on the CPU it already has)."""
        if self.on_cuda:
            mark.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from `start` to `end`; on CUDA the device must have reached `end` (`wait`, or any later sync)."""
        if self.on_cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


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
    """Run `fn` (warmed up) `repeats` times back to back, each call between two marks, and wait for the last
    mark only. On CUDA a call's time includes the copy-stream work it waits on."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    watch = Stopwatch(device)
    if watch.on_cuda:
        torch.cuda.synchronize(device)  # work queued before the first call is not part of it
    marks = []
    for _ in range(repeats):
        start = watch.mark()
        fn()
        marks.append((start, watch.mark()))
    watch.wait(marks[-1][1])
    samples = [watch.seconds(start, end) for start, end in marks]
    return Timing(median_s=statistics.median(samples), min_s=min(samples), samples_s=samples)
