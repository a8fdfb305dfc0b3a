"""Fitting a memory plan to a real card: the card classes presets target, and the start-up check of a plan
against the GPU's free memory (shrink it, or refuse with the numbers).

A plan's device total counts everything the process holds on the GPU, the CUDA context included. The
driver, a display and other processes hold the rest of a card: an 8 GB card has about 7.6 GiB free before
a context exists, so a preset may plan at most CARD_SHARE of its card's nominal memory.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from subspec_core.config import EngineConfig
from subspec_core.errors import SetupError
from subspec_core.planner import BudgetTooSmallError, MemoryPlan, format_bytes, plan_for
from subspec_core.weights import ModelShape

GiB = 2**30
CARD_CLASSES = {"8GB": 8 * GiB, "16GB": 16 * GiB, "24GB": 24 * GiB}  # nominal memory: an "8 GB" card has 8 GiB
CARD_SHARE = 0.95
MIN_PREFILL_CHUNK = 32  # the smallest chunk the start-up check shrinks the prefill to


class DoesNotFitError(SetupError, RuntimeError):
    """The GPU has too little free memory for even the smallest plan of this config."""


def card_bytes(card: str) -> int:
    """A card class's nominal memory ('8GB', '16GB', '24GB'); ValueError names the classes."""
    try:
        return CARD_CLASSES[card.upper().replace(" ", "")]
    except KeyError:
        raise ValueError(f"card must be one of {', '.join(CARD_CLASSES)}, got {card!r}") from None


def card_limit(card: str) -> int:
    """What a plan for this card class may hold on the device: CARD_SHARE of its nominal memory."""
    return int(card_bytes(card) * CARD_SHARE)


# (budget_bytes, prefill_chunk_size or None for the config's own) -> the plan for them; BudgetTooSmallError if none
Replan = Callable[[int, "int | None"], MemoryPlan]


def fit_free_memory(plan: MemoryPlan, *, free_bytes: int, total_bytes: int,
                    replan: Replan) -> tuple[MemoryPlan, str | None]:
    """`plan` if it fits the GPU's `free_bytes` (as `torch.cuda.mem_get_info` reports them, once the CUDA context
    exists: the plan's context reserve is not asked of them); else the plan for what is free, with a start-up
    line saying what shrank: fewer resident layers first (the planner's own order), then halved prefill chunks
    down to MIN_PREFILL_CHUNK. DoesNotFitError, with the numbers and what to set, when even that does not fit."""
    available = free_bytes + plan.context_bytes
    if plan.device_bytes <= available:
        return plan, None
    chunks = [None]
    chunk = plan.prefill_chunk_size // 2
    while chunk >= MIN_PREFILL_CHUNK:
        chunks.append(chunk)
        chunk //= 2
    for chunk in chunks:
        try:
            smaller = replan(available, chunk)
        except BudgetTooSmallError:
            continue
        return smaller, (
            f"the memory plan needs {format_bytes(plan.device_bytes - plan.context_bytes)} on the GPU beyond the CUDA "
            f"context, {format_bytes(free_bytes)} is free: shrunk to {len(smaller.resident_layers)} resident layers "
            f"(from {len(plan.resident_layers)}) and a prefill chunk of {smaller.prefill_chunk_size} "
            f"(from {plan.prefill_chunk_size}); set gpu_memory_budget to {format_bytes(available)} or less to plan "
            "for it from the start"
        )
    raise DoesNotFitError(
        f"not enough free GPU memory: the memory plan needs {format_bytes(plan.device_bytes - plan.context_bytes)} "
        f"beyond the CUDA context (device total {format_bytes(plan.device_bytes)} with its "
        f"{format_bytes(plan.context_bytes)} reserve), and {format_bytes(free_bytes)} of {format_bytes(total_bytes)} "
        f"is free; even its smallest form (fewest resident layers, a prefill chunk of {MIN_PREFILL_CHUNK}) does not "
        "fit. Free GPU memory "
        f"(other processes hold {format_bytes(total_bytes - free_bytes)} with this one's context), or lower "
        "max_model_len or speculation.max_verify_tokens; `subspec plan --config FILE --gpu-memory-budget "
        f"{available // 2**20}MiB` shows what fits"
    )


def fit_device(config: EngineConfig, shape: ModelShape, plan: MemoryPlan, *, dtype: torch.dtype, device: torch.device,
               note: Callable[[str], None]) -> MemoryPlan:
    """On CUDA, `plan` checked against the GPU's free memory now: shrunk to fit (said in one `note`), or
    DoesNotFitError with the numbers (fit.fit_free_memory). Elsewhere `plan` as it is."""
    if device.type != "cuda":
        return plan
    free, total = torch.cuda.mem_get_info(device)

    def replan(budget: int, chunk: int | None) -> MemoryPlan:
        shrunk = config if chunk is None else dataclasses.replace(config, prefill_chunk_size=chunk)
        return plan_for(shrunk, shape, dtype=dtype, device_type=device.type, budget_bytes=budget)

    plan, shrunk = fit_free_memory(plan, free_bytes=free, total_bytes=total, replan=replan)
    if shrunk is not None:
        note(shrunk)
    return plan
