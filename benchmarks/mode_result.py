"""One benchmark mode's measurements: the timed generations it ran, pooled into the table's columns.

Every number here comes from a clock or a counter read during the run; a column that a mode cannot
measure is None ('n/a' in the table), with the reason in `notes`. benchmarks/results/README.md explains
each column.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The table's columns, in order: every mode entry of the JSON file has each of these keys.
COLUMNS = (
    "mode",
    "status",
    "decode_tok_s",
    "ttft_s",
    "mean_accept_length",
    "iterations",
    "draft_ms_per_iter",
    "verify_ms_per_iter",
    "copy_wait_ms_per_iter",
    "verify_h2d_gbps",
    "pinned_h2d_gbps",
    "peak_gpu_gib",
    "budget_gib",
    "speedup_vs_vanilla",
    "speedup_vs_hf_accelerate",
    "identical_to_vanilla",
)


@dataclass
class PromptRun:
    """One greedy generation, timed from outside the engine (perf_counter around its token events)."""

    token_ids: list[int]
    ttft_s: float  # request submitted -> first token on the host (prefill + first choice)
    decode_s: float  # first token on the host -> last token on the host
    iterations: int  # target forwards after prefill
    accepted_tokens: int = 0  # drafted tokens the target accepted (bonus tokens excluded)
    draft_s: float | None = None  # engine's own phase clock; None where the mode has no such phase
    verify_s: float | None = None
    decode_h2d_bytes: int | None = None  # weight bytes copied host-to-device after the first token
    verify_h2d_bytes: int | None = None  # of those, the copies issued while verify forwards ran (no prefetch)
    copy_wait_s: float | None = None  # compute stream stalled on weight copies after the first token
    accept_lengths: list[int] = field(default_factory=list)  # tokens per target forward, from the token events
    chained_iterations: int = 0  # verifies of a tree post-speculation drafted during the previous one

    @property
    def decode_tokens(self) -> int:
        """Tokens produced after the first one (the first one is timed as TTFT)."""
        return max(len(self.token_ids) - 1, 0)


def _total(runs: list[PromptRun], name: str) -> float | None:
    """Sum of an optional per-run field; None when any run lacks it."""
    values = [getattr(r, name) for r in runs]
    return None if not values or any(v is None for v in values) else float(sum(values))


def _ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
    return None if num is None or not den else num / den * scale


@dataclass
class ModeResult:
    """A mode's row of the table (COLUMNS) plus what the JSON keeps for auditing it."""

    mode: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""  # why skipped or failed
    decode_tok_s: float | None = None
    ttft_s: float | None = None
    mean_accept_length: float | None = None
    iterations: int | None = None
    draft_ms_per_iter: float | None = None
    verify_ms_per_iter: float | None = None
    copy_wait_ms_per_iter: float | None = None
    verify_h2d_gbps: float | None = None
    pinned_h2d_gbps: float | None = None
    peak_gpu_gib: float | None = None
    budget_gib: float | None = None
    speedup_vs_vanilla: float | None = None
    speedup_vs_hf_accelerate: float | None = None
    identical_to_vanilla: bool | None = None
    completion_tokens: int | None = None
    resident_layers: list[int] = field(default_factory=list)
    streamed_layers: list[int] = field(default_factory=list)
    peak_gpu_build_gib: float | None = None  # peak while building (quantizing, placing), reset before the run
    memory_plan: str = ""
    attention: dict[str, str] | None = None  # the SDPA kernel per call shape (provenance.engine_record)
    cuda_graphs: bool | None = None  # the draft step's graph capture succeeded; None: not tried
    notes: list[str] = field(default_factory=list)
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)  # per prompt, for the identical-tokens check

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pooled(mode: str, runs: list[PromptRun], *, on_cuda: bool) -> ModeResult:
    """Pool per-prompt runs: rates are total tokens / total seconds; per-iteration figures are totals / iterations."""
    result = ModeResult(mode=mode)
    decode_tokens = sum(r.decode_tokens for r in runs)
    decode_s = sum(r.decode_s for r in runs)
    iterations = sum(r.iterations for r in runs)
    result.decode_tok_s = _ratio(decode_tokens, decode_s)
    result.ttft_s = sum(r.ttft_s for r in runs) / len(runs) if runs else None
    result.iterations = iterations
    # tau: tokens emitted per target forward after prefill, bonus included (as benchmarks.acceptance pools it)
    result.mean_accept_length = _ratio(sum(r.accepted_tokens for r in runs) + iterations, iterations)
    result.draft_ms_per_iter = _ratio(_total(runs, "draft_s"), iterations, 1e3)
    result.verify_ms_per_iter = _ratio(_total(runs, "verify_s"), iterations, 1e3)
    result.copy_wait_ms_per_iter = _ratio(_total(runs, "copy_wait_s"), iterations, 1e3)
    h2d = _total(runs, "verify_h2d_bytes")  # prefetches issued during drafting did not take verify time
    if on_cuda and h2d:  # on the CPU nothing crosses a bus: a memcpy rate is not a host-to-device rate
        result.verify_h2d_gbps = _ratio(h2d / 1e9, _total(runs, "verify_s"))
    result.completion_tokens = sum(len(r.token_ids) for r in runs)
    result.token_ids = [list(r.token_ids) for r in runs]
    result.per_prompt = [
        {"prompt": i, "tokens": len(r.token_ids), "ttft_s": r.ttft_s, "decode_s": r.decode_s, "iterations": r.iterations,
         "accepted_tokens": r.accepted_tokens, "draft_s": r.draft_s, "verify_s": r.verify_s,
         "decode_h2d_bytes": r.decode_h2d_bytes, "verify_h2d_bytes": r.verify_h2d_bytes, "copy_wait_s": r.copy_wait_s, "accept_lengths": r.accept_lengths}
        for i, r in enumerate(runs)
    ]
    return result


def compare_modes(results: list[ModeResult]) -> bool | None:
    """Fill speedups (decode tokens/s ratios) and identical_to_vanilla; returns the subspec-vs-vanilla check."""
    by_mode = {r.mode: r for r in results if r.status == "ok"}
    vanilla, hf = by_mode.get("vanilla"), by_mode.get("hf-accelerate")
    for r in by_mode.values():
        r.speedup_vs_vanilla = _ratio(r.decode_tok_s, vanilla.decode_tok_s) if vanilla else None
        r.speedup_vs_hf_accelerate = _ratio(r.decode_tok_s, hf.decode_tok_s) if hf else None
        r.identical_to_vanilla = r.token_ids == vanilla.token_ids if vanilla else None
    subspec = by_mode.get("subspec")
    return subspec.identical_to_vanilla if subspec and vanilla else None
