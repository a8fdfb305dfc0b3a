"""What ran, recorded in every benchmark result: the device and its libraries, and per engine the attention
kernel of each call shape and whether the draft step's CUDA-graph capture succeeded."""

from __future__ import annotations

from typing import Any

import torch

from subspec_core.engine import Engine
from subspec_core.hardware import DeviceInfo


def device_record(device: torch.device) -> dict[str, Any]:
    """{"device": name or "cpu", "compute_capability": "9.0" or None, "torch", "cuda", "cudnn"} (None on a CPU)."""
    return DeviceInfo.of(device).as_dict()


def graph_capture(engine: Engine) -> bool | None:
    """Whether the CUDA-graph capture succeeded (the draft steps with a draft, else the one-token step); None where
    none was tried (a CPU, or cuda_graphs off)."""
    if not (engine.config.cuda_graphs and engine.device.type == "cuda"):
        return None
    return engine.drafter.graphed if engine.drafter is not None else engine.step_graphs is not None


def engine_record(engine: Engine) -> dict[str, Any]:
    """{"attention": {call shape: kernel}, "cuda_graphs": True | False | None} of a built engine."""
    return {"attention": engine.attention.as_dict(), "cuda_graphs": graph_capture(engine)}
