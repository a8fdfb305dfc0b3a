"""Phase timing without host synchronisation: CUDA events on the GPU, perf_counter on the CPU.

Marks are recorded on the current stream; durations are read only after the iteration's one host sync
(the accepted path's transfer), so timing never stalls the pipeline.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class PhaseClock:
    """Records time marks on a device and measures seconds between two of them."""

    def __init__(self, device: torch.device) -> None:
        self.on_cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from `start` to `end`. On CUDA both must have completed: call it after the step's read of
        its results, which waited for everything recorded before it (no extra synchronisation here)."""
        if self.on_cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start
