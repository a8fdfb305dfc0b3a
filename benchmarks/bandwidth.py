"""Pinned host-to-device bandwidth, measured once at start: the ceiling any weight streaming can reach.

One large copy from page-locked host memory into a device buffer, timed with CUDA events on a side stream
(the way the engine's LayerStreamer copies), repeated; the median is the reference the table compares the
bandwidth achieved during verification against.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from subspec_core.stopwatch import Stopwatch

CPU_NOTE = "n/a on CPU (no CUDA device: nothing is copied over a bus)"


@dataclass(frozen=True)
class PinnedBandwidth:
    """Median and best GB/s (1e9 bytes/s) of `nbytes` copies; gbps is None without CUDA."""

    gbps: float | None
    best_gbps: float | None = None
    nbytes: int = 0
    samples_gbps: list[float] = field(default_factory=list)
    note: str = ""


def measure_pinned_h2d(device: torch.device, *, nbytes: int = 1 << 30, repeats: int = 5) -> PinnedBandwidth:
    """Time `repeats` copies of `nbytes` pinned host bytes to `device` (after one warm-up copy)."""
    if device.type != "cuda":
        return PinnedBandwidth(gbps=None, note=CPU_NOTE)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # a power of two: no pinned-allocator rounding waste
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device=device)
    watch = Stopwatch(device)
    samples = []
    with torch.cuda.stream(stream):  # the watch marks the current stream: this side stream
        dest.copy_(host, non_blocking=True)  # warm-up: first-touch mappings, DMA engine wake-up
        for _ in range(repeats):
            start = watch.mark()
            dest.copy_(host, non_blocking=True)
            end = watch.mark()
            watch.wait(end)
            samples.append(nbytes / watch.seconds(start, end) / 1e9)
    del host, dest
    torch.cuda.empty_cache()
    return PinnedBandwidth(
        gbps=statistics.median(samples), best_gbps=max(samples), nbytes=nbytes, samples_gbps=samples,
        note=f"median of {repeats} pinned copies of {nbytes / 2**30:.2f} GiB, CUDA events on a side stream",
    )
