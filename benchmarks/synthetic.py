"""The synthetic paper-scale mode: the mechanics of one decoding iteration on a random-weight model.

With random weights acceptance means nothing, so nothing here generates text. Under the run's budget it
builds a `vanilla` engine and times one decoding token (one streamed target forward), frees it, then builds
a `subspec` engine and times one draft tree (and so one draft step) and one verification forward over trees
of 64 / 193 / 289 nodes (and of the configured verify size). From those it derives the floor (streamed bytes /
the pinned bandwidth measured at start) and PROJECTS tokens/s at an acceptance length tau:
tau / (draft tree + verify forward). Projections are labelled as such everywhere they appear.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any, Callable

import torch

from benchmarks.copy_wait import CopyWaitProbe
from benchmarks.gpu_memory import GIB, free_device_memory, peak_gib, reset_peak
from benchmarks.mechanics import draft_tree, verify_set
from benchmarks.provenance import device_record, engine_record
from benchmarks.synthetic_weights import SHAPES, random_weights
from subspec_core.build import InMemoryWeights, engine_from_weights, resolve_device, resolve_dtype
from subspec_core.config import EngineConfig
from subspec_core.engine import Engine
from subspec_core.planner import BudgetTooSmallError
from subspec_core.stopwatch import time_call
from subspec_core.weights import LayerLayout, ModelShape, SharedWeights

PAPER_TAU = 28.35  # Qwen2.5-7B, MT-Bench, 8 GB, tree decoding (the paper's table)
VERIFY_SIZES = (64, 193, 289)  # 289 = 48 x 6 + 1 (the paper's trees), 193 = 32 x 6 + 1
PREFIX_TOKENS = 128  # committed context the decoding forwards attend to


def synthetic_engine(config: EngineConfig, mode: str, weights: InMemoryWeights, device: torch.device) -> Engine:
    """The random weights placed under the run's budget in `mode`, as `build_engine` places real ones."""
    return engine_from_weights(replace(config, mode=mode), weights, device=device, model_name=f"synthetic-{mode}")


def build_engine(config: EngineConfig, mode: str, shape: ModelShape, shared: SharedWeights,
                 layer_linears: list[dict[str, torch.Tensor]], tokenizer: Any, device: torch.device,
                 dtype: torch.dtype) -> Engine:
    """The shared device check's entry (/work/shared/device/device_check.py calls it with exactly these positional
    arguments; keep them): `synthetic_engine` over the given random weights. `dtype` is theirs already."""
    if layer_linears[0]["qkv_weight"].dtype != dtype:
        raise ValueError(f"weights are placed in their own dtype ({layer_linears[0]['qkv_weight'].dtype}), not {dtype}")
    weights = InMemoryWeights(shape=shape, shared=shared, layer_linears=layer_linears, tokenizer=tokenizer)
    return synthetic_engine(config, mode, weights, device)


def _timed(fn: Callable[[], Any], *, probe: CopyWaitProbe | None, device: torch.device, repeats: int) -> dict[str, Any]:
    """Warm `fn` up once, then time `repeats` calls; the copy wait is the probe's total per call."""
    fn()
    mark = probe.mark() if probe else 0
    timing = time_call(fn, device=device, repeats=repeats)
    wait = probe.seconds_since(mark) / repeats if probe else None
    if probe:
        probe.clear()
    return {"ms": timing.median_ms, "min_ms": timing.min_s * 1e3, "samples_ms": [s * 1e3 for s in timing.samples_s],
            "copy_wait_ms": None if wait is None else wait * 1e3}


def _measure_engine(engine: Engine, mode: str, *, prefix: list[int], device: torch.device, repeats: int) -> dict[str, Any]:
    """Time what `mode` does per iteration on an engine whose KV holds nothing yet."""
    p = len(prefix)
    root = torch.tensor(prefix[-1:], dtype=torch.long, device=device)
    position = torch.tensor([p], dtype=torch.long, device=device)
    probe = CopyWaitProbe.attach(engine)
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            engine.prompt_logits(prefix)  # fills KV slots [0, P) that every timed forward attends to
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            measured: dict[str, Any] = {f"{mode}_prefill_ms": (time.perf_counter() - started) * 1e3}
            if mode == "vanilla":
                measured["vanilla_token"] = _timed(
                    lambda: engine.step_logits(root, position, prefix_length=p), probe=probe, device=device, repeats=repeats
                )
                return measured
            spec = engine.config.speculation
            measured["draft_depth"] = spec.max_depth
            measured["draft_tree"] = _timed(
                lambda: draft_tree(engine, root=root, prefix_length=p, depth=spec.max_depth), probe=probe, device=device,
                repeats=repeats,
            )
            sizes = sorted(set(VERIFY_SIZES) | {spec.verify_size})
            if p + max(sizes) > engine.kv_cache.capacity:
                raise ValueError(f"a {max(sizes)}-node tree after {p} prefix tokens needs more KV slots than max_model_len gives")
            tree = draft_tree(engine, root=root, prefix_length=p, depth=spec.max_depth)
            measured["verify"] = {}
            for n in sizes:
                nodes = verify_set(tree, n, topk=spec.topk, vocab_size=engine.shape.vocab_size)
                measured["verify"][str(n)] = _timed(
                    lambda nodes=nodes: engine.verify_logits(nodes, prefix_length=p), probe=probe, device=device,
                    repeats=repeats,
                )
            return measured
    finally:
        if probe:
            probe.close()


def _engine_section(engine: Engine, *, shape: ModelShape, dtype: torch.dtype, pinned_gbps: float | None,
                    device: torch.device, build_peak: float | None) -> dict[str, Any]:
    plan = engine.plan
    assert plan is not None
    streamed_bytes = len(plan.streamed_layers) * LayerLayout.for_shape(shape).nbytes(dtype)
    return {
        "status": "ok",
        "resident_layers": list(plan.resident_layers),
        "streamed_layers": list(plan.streamed_layers),
        "streamed_gb_per_forward": streamed_bytes / 1e9,
        # the floor: a target forward cannot finish before its streamed weights have crossed the bus
        "floor_ms": streamed_bytes / (pinned_gbps * 1e9) * 1e3 if pinned_gbps else None,
        "peak_gpu_gib": peak_gib(device),
        "peak_gpu_build_gib": build_peak,
        "budget_gib": None if plan.budget_bytes is None else plan.budget_bytes / GIB,
        "memory_plan": plan.table(),
        **engine_record(engine),
    }


def project(*, tau: float | None, source: str, measured: dict[str, Any], engines: dict[str, Any], verify_size: int,
            max_depth: int) -> dict[str, Any]:
    """PROJECTED tokens/s at acceptance length tau: tau tokens per (draft tree + verify forward) iteration."""
    out: dict[str, Any] = {"label": "projection", "tau": tau, "tau_source": source, "tokens_per_s": None,
                           "speedup_vs_vanilla": None, "tokens_per_s_at_floor": None, "note": ""}
    tree, verify = measured.get("draft_tree"), measured.get("verify", {}).get(str(verify_size))
    if tau is None or tree is None or verify is None:
        out["note"] = "not available in this run"
        return out
    iteration_s = (tree["ms"] + verify["ms"]) / 1e3
    out["tokens_per_s"] = tau / iteration_s
    vanilla = measured.get("vanilla_token")
    if vanilla:
        out["speedup_vs_vanilla"] = out["tokens_per_s"] * vanilla["ms"] / 1e3
    floor = engines.get("subspec", {}).get("floor_ms")
    if floor:  # if drafting were fully hidden behind the copies and those ran at the pinned bandwidth
        out["tokens_per_s_at_floor"] = tau / (floor / 1e3)
    notes = [f"iteration = draft tree (depth {max_depth}) + verify forward ({verify_size} nodes), no overlap"]
    if tau > max_depth + 1:
        notes.append(f"tau exceeds max_depth + 1 = {max_depth + 1}: unreachable at this depth")
    out["note"] = "; ".join(notes)
    return out


def run_synthetic(
    name: str, config: EngineConfig, *, tokenizer: Any, pinned_gbps: float | None, repeats: int,
    measured_tau: float | None = None, measured_tau_source: str = "",
) -> dict[str, Any]:
    """Generate the random model, measure vanilla then subspec mechanics, and project tokens/s."""
    shape = SHAPES[name]
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    if name != "tiny" and device.type != "cuda":
        raise RuntimeError(f"--synthetic {name} draws a full-size model and needs a CUDA device (on the CPU: --synthetic tiny)")
    started = time.perf_counter()
    seed = config.seed or 0  # the same random model in every run unless a seed is asked for
    shared, layer_linears = random_weights(shape, dtype=dtype, device=device, seed=seed)
    weights = InMemoryWeights(shape=shape, shared=shared, layer_linears=layer_linears, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(shape.vocab_size, (PREFIX_TOKENS,), generator=generator).tolist()
    spec = config.speculation
    report: dict[str, Any] = {
        "name": name, "shape": asdict(shape), "device": str(device), "environment": device_record(device),
        "dtype": str(dtype).removeprefix("torch."),
        "weights_generated_s": time.perf_counter() - started, "prefix_tokens": PREFIX_TOKENS, "repeats": repeats,
        "topk": spec.topk, "max_depth": spec.max_depth, "verify_size": spec.verify_size, "pinned_h2d_gbps": pinned_gbps,
        "engines": {}, "measured": {},
        "notes": ["random weights: acceptance is meaningless, only the mechanics are measured",
                  "timed forwards exclude the greedy choice, the accepted-path walk and the KV compaction"],
    }
    for mode in ("vanilla", "subspec"):
        free_device_memory()
        reset_peak(device)
        try:
            engine = synthetic_engine(config, mode, weights, device)
        except (BudgetTooSmallError, torch.cuda.OutOfMemoryError) as exc:
            report["engines"][mode] = {"status": "skipped", "reason": f"does not fit: {exc}"}
            continue
        try:
            build_peak = peak_gib(device)
            reset_peak(device)
            report["measured"].update(_measure_engine(engine, mode, prefix=prefix, device=device, repeats=repeats))
            report["engines"][mode] = _engine_section(
                engine, shape=shape, dtype=dtype, pinned_gbps=pinned_gbps, device=device, build_peak=build_peak
            )
        finally:
            engine.close()
            del engine
            free_device_memory()
    del shared, layer_linears, weights
    free_device_memory()
    if "draft_tree" in report["measured"]:
        report["measured"]["draft_step_ms"] = report["measured"]["draft_tree"]["ms"] / spec.max_depth
    common = dict(measured=report["measured"], engines=report["engines"], verify_size=spec.verify_size, max_depth=spec.max_depth)
    report["projections"] = [
        project(tau=PAPER_TAU, source="paper (Qwen2.5-7B, MT-Bench, depth 48)", **common),
        project(tau=measured_tau, source=measured_tau_source or "measured on real weights: no subspec run", **common),
    ]
    return report
