"""Our engine's modes (`subspec`, `vanilla`, `resident`), greedy, timed from outside through `Engine.generate`.

Each mode gets its own engine, built from the same resolved config with only `mode` changed, run, and freed
before the next one is built. TTFT and decode time come from perf_counter around the token events (each event
follows a host sync in the engine, so the clock sees finished work); draft/verify splits and iteration and
acceptance counts come from the engine's RequestStats; bytes from the streamer's h2d counter.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from benchmarks.copy_wait import CopyWaitProbe
from benchmarks.gpu_memory import GIB, free_device_memory, peak_gib, reset_peak
from benchmarks.mode_result import ModeResult, PromptRun, pooled
from benchmarks.provenance import engine_record
from subspec_core.config import EngineConfig
from subspec_core.build import build_engine, resolve_device
from subspec_core.engine import Engine
from subspec_core.planner import BudgetTooSmallError
from subspec_core.types import GenerationRequest, SamplingParams

ENGINE_MODES = ("subspec", "vanilla", "resident")


def timed_generation(engine: Engine, prompt: list[int], *, max_tokens: int, probe: CopyWaitProbe | None) -> PromptRun:
    """One greedy generation; the first event carries the prefill's token, the last one the stats."""
    request = GenerationRequest("bench", tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))
    layers = engine.target_layers
    start = time.perf_counter()
    events = engine.generate(request)
    first = next(events)
    first_at = time.perf_counter()
    h2d_at_first, wait_mark = layers.h2d_bytes, probe.mark() if probe else 0
    ids, stats, last_at, accept_lengths = list(first.token_ids), first.stats, first_at, []
    for event in events:
        ids.extend(event.token_ids)
        stats = event.stats or stats
        accept_lengths.append(event.accept_length)
        last_at = time.perf_counter()
    assert stats is not None, "the engine's last event carries the request's stats"
    streamed = layers.streamer is not None
    run = PromptRun(
        token_ids=ids, ttft_s=first_at - start, decode_s=last_at - first_at, iterations=stats.iterations,
        accepted_tokens=stats.accepted_tokens, draft_s=stats.draft_s if engine.draft_layers is not None else None,
        verify_s=stats.verify_s, decode_h2d_bytes=layers.h2d_bytes - h2d_at_first if streamed else None,
        verify_h2d_bytes=stats.verify_h2d_bytes if streamed else None,
        copy_wait_s=probe.seconds_since(wait_mark) if probe else None, accept_lengths=accept_lengths,
        chained_iterations=stats.chained_iterations,
    )
    if probe:
        probe.clear()
    return run


def run_engine_mode(
    config: EngineConfig, mode: str, prompts: list[list[int]], *, max_tokens: int, warmup_tokens: int
) -> ModeResult:
    """Build the mode's engine, warm it up, time every prompt, free it. A mode that does not fit is 'skipped'."""
    device = resolve_device(config)
    free_device_memory()
    reset_peak(device)
    try:
        engine = build_engine(replace(config, mode=mode), progress=False)  # only the mode differs
    except (BudgetTooSmallError, torch.cuda.OutOfMemoryError) as exc:
        free_device_memory()
        return ModeResult(mode=mode, status="skipped", reason=f"does not fit: {exc}")
    probe = None
    try:
        build_peak = peak_gib(device)
        reset_peak(device)
        if warmup_tokens > 0:  # kernels, bitsandbytes and allocator warm-up: not part of any timing
            timed_generation(engine, prompts[0], max_tokens=warmup_tokens, probe=None)
        probe = CopyWaitProbe.attach(engine)
        runs = [timed_generation(engine, p, max_tokens=max_tokens, probe=probe) for p in prompts]
        result = pooled(mode, runs, on_cuda=device.type == "cuda")
        result.peak_gpu_gib = peak_gib(device)
        result.peak_gpu_build_gib = build_peak
        what_ran = engine_record(engine)
        result.attention, result.cuda_graphs = what_ran["attention"], what_ran["cuda_graphs"]
        plan = engine.plan
        if plan is not None:
            result.resident_layers, result.streamed_layers = list(plan.resident_layers), list(plan.streamed_layers)
            result.budget_gib = None if plan.budget_bytes is None else plan.budget_bytes / GIB
            result.memory_plan = plan.table()
        if device.type != "cuda":
            result.notes.append("copy wait, H2D GB/s and GPU memory are n/a on CPU")
        elif probe is None:
            result.notes.append("nothing streamed: no copies to wait for")
        if mode == "vanilla":
            result.notes.append("verify_ms_per_iter: the plain one-token target step (forward + greedy choice)")
        return result
    finally:
        if probe:
            probe.close()
        engine.close()
        del engine
        free_device_memory()
