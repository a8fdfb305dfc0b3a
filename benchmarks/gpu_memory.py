"""Honest GPU memory per mode: peaks reset between modes, and each mode's engine freed before the next is built.

Peaks are torch's allocator counters (`max_memory_allocated`): every tensor the engine, bitsandbytes and
transformers allocate through torch, not the CUDA context or cuBLAS workspaces. On the CPU they are n/a.
"""

from __future__ import annotations

import gc

import torch

GIB = 2**30


def reset_peak(device: torch.device) -> None:
    """Start a new peak window (after freeing what the previous mode held)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GiB since the last `reset_peak`, or None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GIB


def free_device_memory() -> None:
    """Collect unreachable engines/models and return their cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
