"""What one draft step costs: aten dispatches, host syncs, shape stability and time, on any machine.

    python -m benchmarks.draft_cost [--json] [--quant-types int4,nf4] [--qwen-layers 2] [--repeats 20]

A draft step is launch-bound (a few rows through every layer), so its cost is counted in ops, not FLOPs.
On random-weight engines built with the engine's own code (`engine_from_weights`), it measures:
- `dispatches_per_layer`: aten ops one level step's draft forward dispatches per decoder layer, views
  included (the difference between a 4-layer and a 2-layer model of the same shape, halved, so embedding
  and logits are not counted), in the GPU's dtype (bfloat16);
- `bookkeeping_dispatches_per_level`: the level step's ops outside the draft forward (tree growth, mask);
- `syncs_per_iteration` / `syncs_per_vanilla_token`: reads of device data by the host during one
  speculative iteration / one vanilla token: `item`, `tolist`, `cpu`, `numpy`, Python conversions of a
  tensor (bool, int, float, index), ops whose output size depends on data (`nonzero`, boolean-mask
  indexing, ...), and host-to-device copies from Python data (`torch.tensor(..., device=...)`);
- `static_shapes`: whether two level steps at different N and depth dispatched the same ops on the same shapes;
- `draft_kv_read`: the KV rows a draft step's attention reads at N = 100 and N = 4000 (its bucket, not the
  whole cache), with max_model_len 8192 and the paper's tree, and those rows' bytes in a Qwen2.5-7B cache;
- host time per draft step (the tiny model, and a Qwen2.5-7B-shaped stack of `--qwen-layers` layers where
  memory allows); on CUDA also the GPU time per step (CUDA events), replaying the captured graphs
  (`gpu_ms_per_step_graphed`, when capture succeeded) and launching every op (`gpu_ms_per_step_eager`);
- what ran: the device and its libraries, and each engine's attention kernels and graph capture.
The last stdout line is one JSON object (with --json); the lines before it are a readable summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.provenance import device_record, engine_record
from benchmarks.synthetic import synthetic_engine
from benchmarks.synthetic_weights import QWEN25_7B, TINY, random_weights
from subspec_core.build import InMemoryWeights, resolve_device, resolve_dtype
from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.drafting import DraftBucket
from subspec_core.engine import Engine
from subspec_core.kv_cache import KVCache
from subspec_core.loading import load_tokenizer
from subspec_core.quant import int4_kernel_name
from subspec_core.stopwatch import time_call
from subspec_core.types import GenerationRequest, SamplingParams
from subspec_core.weights import ModelShape

# ops whose output shape depends on tensor data: on CUDA each waits for the device
_DATA_DEPENDENT_OPS = ("nonzero", "masked_select", "unique", "_unique2", "repeat_interleave.Tensor", "_local_scalar_dense")
_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class DispatchRecorder(TorchDispatchMode):
    """Records every aten op dispatched, with the shapes of its tensor arguments; `mark` splits the record."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in (*args, *kwargs.values()))
        self.ops.append((str(func), shapes))
        return func(*args, **kwargs)


class SyncCounter:
    """Counts the host's reads of device data (see the module docstring) while installed."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._depth = 0  # a host read implemented with another (tolist -> item) counts once

    @contextmanager
    def installed(self) -> Iterator["SyncCounter"]:
        originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
        tensor_factories = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

        def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def counted(*args: Any, **kwargs: Any) -> Any:
                if self._depth == 0:
                    self.events.append(name)
                self._depth += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self._depth -= 1
            return counted

        def factory(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def counted(data: Any, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("device") is not None and not isinstance(data, torch.Tensor) and self._depth == 0:
                    self.events.append(f"torch.{name}(host data, device=...)")
                return original(data, *args, **kwargs)
            return counted

        counter = self

        class DataDependentOps(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                name = str(func).removeprefix("aten.")
                bool_index = name.startswith(("index.", "index_put")) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for a in args if isinstance(a, (list, tuple)) for i in a
                )
                if counter._depth == 0 and (name.startswith(_DATA_DEPENDENT_OPS) or bool_index):
                    counter.events.append(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        try:
            for name, original in originals.items():
                setattr(torch.Tensor, name, wrap(name, original))
            for name, original in tensor_factories.items():
                setattr(torch, name, factory(name, original))
            with DataDependentOps():
                yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            for name, original in tensor_factories.items():
                setattr(torch, name, original)


def random_engine(shape: ModelShape, *, quant_type: str, dtype: str, mode: str = "subspec", topk: int = 6,
                  max_depth: int = 8, max_model_len: int = 256, device: str = "auto") -> Engine:
    """An engine over random weights of `shape`, every layer streamed, built as the real one is."""
    config = EngineConfig(
        model="random", mode=mode, device=device, dtype=dtype, max_resident_layers=0, max_model_len=max_model_len,
        prefill_chunk_size=64, speculation=SpeculationConfig(topk=topk, max_depth=max_depth, quant_type=quant_type),
    )
    torch_device = resolve_device(config)
    shared, layers = random_weights(shape, dtype=resolve_dtype(config, torch_device), device=torch_device, seed=0)
    weights = InMemoryWeights(shape=shape, shared=shared, layer_linears=layers, tokenizer=load_tokenizer(EngineConfig()))
    return synthetic_engine(config, mode, weights, torch_device)


def _prefill(engine: Engine, length: int) -> None:
    """Fill KV rows [0, length) with random tokens (a prefix the draft attends to)."""
    ids = torch.randint(engine.shape.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    engine.prompt_logits(ids)


def _start_tree(engine: Engine, prefix: int) -> DraftBucket:
    """Prefill `prefix` tokens and run the root step in the bucket a full-depth grow picks: the drafter is
    ready for level steps in that bucket."""
    assert engine.drafter is not None
    _prefill(engine, prefix)
    drafter = engine.drafter
    bucket = drafter.bucket_for(committed=prefix, depth=drafter.max_depth)
    drafter.root_token.fill_(1)
    drafter.prefix_length.fill_(prefix)
    drafter.root_step(bucket)
    return bucket


def level_step_ops(engine: Engine, *, prefix: int, level: int) -> tuple[list, list]:
    """(ops of the draft forward, ops of the whole level step) for the step that drafts level `level` (>= 2)."""
    drafter = engine.drafter
    assert drafter is not None and 2 <= level <= drafter.max_depth
    with torch.inference_mode():
        bucket = _start_tree(engine, prefix)
        for _ in range(level - 2):
            drafter.level_step(bucket)
        recorder = DispatchRecorder()
        marks: list[int] = []
        forward = drafter.draft_logits

        def marked(*args: Any) -> torch.Tensor:
            marks.append(len(recorder.ops))
            out = forward(*args)
            marks.append(len(recorder.ops))
            return out

        drafter.draft_logits = marked
        try:
            with recorder:
                drafter.level_step(bucket)
        finally:
            drafter.draft_logits = forward
    start, end = marks
    return recorder.ops[start:end], recorder.ops


def count_dispatches(shape: ModelShape, *, quant_type: str, dtype: str) -> dict[str, Any]:
    """Dispatches per decoder layer (4 layers minus 2, halved) and of the bookkeeping per level."""
    counts = {}
    for layers in (2, 4):
        engine = random_engine(replace(shape, num_layers=layers), quant_type=quant_type, dtype=dtype, device="cpu")
        forward, step = level_step_ops(engine, prefix=20, level=3)
        counts[layers] = (len(forward), len(step) - len(forward), forward)
        engine.close()
    per_layer = (counts[4][0] - counts[2][0]) / 2
    # which ops a layer adds, e.g. {"aten.rms_norm.default": 2, ...}
    extra = Counter(name for name, _ in counts[4][2]) - Counter(name for name, _ in counts[2][2])
    return {"dispatches_per_layer": per_layer, "bookkeeping_dispatches_per_level": counts[4][1],
            "forward_dispatches_outside_layers": counts[2][0] - 2 * per_layer,
            "ops_per_layer": {name: n / 2 for name, n in sorted(extra.items())}}


def static_shapes(engine: Engine) -> bool:
    """Two level steps at different N and depth (in one bucket) dispatch identical ops on identical shapes."""
    _, first = level_step_ops(engine, prefix=12, level=2)
    _, second = level_step_ops(engine, prefix=47, level=5)
    return first == second


def draft_kv_read_bytes(engine: Engine, *, prefix: int) -> int:
    """Bytes of keys and values one level step's attention reads at N = prefix, over all layers: the KV-cache
    views its forward asks for (the attention reads every row of them, masked or not)."""
    drafter, cache = engine.drafter, engine.kv_cache
    assert drafter is not None
    views = cache.attention_views
    elements: list[int] = []

    def recorded(layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = views(layer, length)
        elements.append(keys.numel() + values.numel())
        return keys, values

    with torch.inference_mode():
        bucket = _start_tree(engine, prefix)
        cache.attention_views = recorded  # type: ignore[method-assign]
        try:
            drafter.level_step(bucket)
        finally:
            del cache.attention_views
    return sum(elements) * cache.data.element_size()


def kv_read(*, quant_type: str, prefixes: tuple[int, ...] = (100, 4000), max_model_len: int = 8192, topk: int = 6,
            max_depth: int = 48) -> dict[str, Any]:
    """KV rows a draft step reads at each N, measured on a tiny engine with the paper's tree (topk 6 x depth 48),
    and the bytes those rows are in a Qwen2.5-7B-shaped cache in bfloat16 (28 layers, 4 kv heads x 128)."""
    engine = random_engine(TINY, quant_type=quant_type, dtype="float32", topk=topk, max_depth=max_depth,
                           max_model_len=max_model_len)
    assert engine.drafter is not None
    row = KVCache.bytes_needed(num_layers=TINY.num_layers, num_kv_heads=TINY.num_kv_heads, head_dim=TINY.head_dim,
                               capacity=1, dtype=engine.kv_cache.data.dtype)
    qwen_row = KVCache.bytes_needed(num_layers=QWEN25_7B.num_layers, num_kv_heads=QWEN25_7B.num_kv_heads,
                                    head_dim=QWEN25_7B.head_dim, capacity=1, dtype=torch.bfloat16)
    try:
        rows = {str(n): draft_kv_read_bytes(engine, prefix=n) // row for n in prefixes}
        capacity, buckets = engine.kv_cache.capacity, list(engine.drafter.bucket_lengths)
    finally:
        engine.close()
    return {"max_model_len": max_model_len, "topk": topk, "max_depth": max_depth, "buckets": buckets,
            "cuda_graphs": 2 * len(buckets), "rows": rows, "whole_cache_rows": capacity,
            "qwen2.5-7b_bf16_bytes": {n: r * qwen_row for n, r in rows.items()},
            "qwen2.5-7b_bf16_whole_cache_bytes": capacity * qwen_row}


def _next_counting(events: Iterator[Any], counter: SyncCounter) -> Any:
    with counter.installed():
        return next(events)


def syncs_per_step(engine: Engine, *, steps: int = 3) -> float:
    """Host reads per decoding step (a speculative iteration, or a vanilla token), after the prefill's."""
    request = GenerationRequest("syncs", tuple(range(1, 17)), SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    events = engine.generate(request)
    counts = []
    with torch.inference_mode():
        next(events)  # the prefill and the first token
        for _ in range(steps):
            counter = SyncCounter()
            event = _next_counting(events, counter)
            counts.append(len(counter.events))
            if event.finished:
                break
    events.close()
    return sum(counts) / len(counts)


def draft_step_times(engine: Engine, *, repeats: int) -> dict[str, Any]:
    """Milliseconds per draft step: whole trees of max_depth forwards, timed and divided by the depth. The host
    time is grow()'s (graph replays where capture succeeded: `graphed`); on CUDA the GPU time both ways."""
    drafter = engine.drafter
    assert drafter is not None
    device, depth = engine.device, drafter.max_depth
    root = torch.ones(1, dtype=torch.long, device=device)
    prefix = torch.full((1,), 32, dtype=torch.long, device=device)

    def grow() -> None:
        drafter.grow(root_token=root, prefix_length=prefix, committed=32, depth=depth)

    def grow_eagerly() -> None:  # grow() without its graphs: the same steps, every op launched
        drafter.root_token.copy_(root)
        drafter.prefix_length.copy_(prefix)
        drafter.root_step()
        for _ in range(depth - 1):
            drafter.level_step()

    with torch.inference_mode():
        _prefill(engine, 32)
        grow()  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            grow()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result: dict[str, Any] = {"depth": depth, "graphed": drafter.graphed,
                                  "host_ms_per_step": (time.perf_counter() - started) / repeats / depth * 1e3}
        if device.type == "cuda":
            if drafter.graphed:
                result["gpu_ms_per_step_graphed"] = time_call(grow, device=device, repeats=repeats).median_ms / depth
            result["gpu_ms_per_step_eager"] = time_call(grow_eagerly, device=device, repeats=repeats).median_ms / depth
    return result


def measure(*, quant_types: list[str], qwen_layers: int, repeats: int) -> dict[str, Any]:
    device = resolve_device(EngineConfig())
    result: dict[str, Any] = {**device_record(device), "int4_kernel": int4_kernel_name(device)}
    per_quant: dict[str, Any] = {}
    for quant in quant_types:
        entry = count_dispatches(TINY, quant_type=quant, dtype="bfloat16")
        entry["dispatches_per_layer_float32"] = count_dispatches(TINY, quant_type=quant, dtype="float32")["dispatches_per_layer"]
        engine = random_engine(TINY, quant_type=quant, dtype="float32", max_depth=8)
        entry["static_shapes"] = static_shapes(engine)
        entry["syncs_per_iteration"] = syncs_per_step(engine)
        entry["tiny_times"] = draft_step_times(engine, repeats=repeats)
        entry.update(engine_record(engine))
        engine.close()
        per_quant[quant] = entry
        print(f"{quant}: {entry['dispatches_per_layer']:.0f} dispatches/layer (bf16), "
              f"{entry['dispatches_per_layer_float32']:.0f} (fp32), bookkeeping {entry['bookkeeping_dispatches_per_level']} "
              f"per level, syncs/iteration {entry['syncs_per_iteration']:.2f}, static shapes {entry['static_shapes']}, "
              f"tiny host {entry['tiny_times']['host_ms_per_step']:.2f} ms/step", file=sys.stderr, flush=True)
    result["draft_kv_read"] = read = kv_read(quant_type=quant_types[0])
    print(f"draft KV read per step (Qwen2.5-7B shape, bf16, max_model_len {read['max_model_len']}): "
          + ", ".join(f"N={n}: {r} rows, {read['qwen2.5-7b_bf16_bytes'][n] / 2**20:.1f} MiB"
                      for n, r in read["rows"].items())
          + f"; the whole cache: {read['qwen2.5-7b_bf16_whole_cache_bytes'] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    vanilla = random_engine(TINY, quant_type=quant_types[0], dtype="float32", mode="vanilla")
    result["syncs_per_vanilla_token"] = syncs_per_step(vanilla)
    vanilla.close()
    if qwen_layers > 0:
        result["qwen2.5-7b_shape"] = qwen_stack_times(qwen_layers, quant_types[0], repeats=max(3, repeats // 4))
    headline = per_quant[quant_types[0]]
    result.update(
        quant_type=quant_types[0],
        dispatches_per_layer=headline["dispatches_per_layer"],
        bookkeeping_dispatches_per_level=headline["bookkeeping_dispatches_per_level"],
        syncs_per_iteration=max(e["syncs_per_iteration"] for e in per_quant.values()),
        static_shapes=all(e["static_shapes"] for e in per_quant.values()),
        attention=headline["attention"],
        cuda_graphs=headline["cuda_graphs"],
        per_quant_type=per_quant,
    )
    return result


def qwen_stack_times(layers: int, quant_type: str, *, repeats: int) -> dict[str, Any]:
    """Time level steps on a Qwen2.5-7B-shaped stack of `layers` decoder layers (topk 6), where memory allows."""
    shape = replace(QWEN25_7B, num_layers=layers)
    try:
        dtype = "bfloat16"
        engine = random_engine(shape, quant_type=quant_type, dtype=dtype, max_depth=4, max_model_len=512)
    except (RuntimeError, MemoryError) as exc:  # noqa: PERF203 - report, do not fail the other figures
        return {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
    try:
        times = draft_step_times(engine, repeats=repeats)
    finally:
        engine.close()
    per_layer = times["host_ms_per_step"] / layers
    return {"status": "ok", "layers": layers, "dtype": dtype, "quant_type": quant_type, **times, **engine_record(engine),
            "host_ms_per_layer": per_layer,
            "note": "host time includes the lm_head over 152k vocab rows; 28 layers are not built on a CPU machine"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.draft_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object")
    parser.add_argument("--quant-types", default="int4,nf4", help="comma-separated; the first is the headline")
    parser.add_argument("--qwen-layers", type=int, default=2, help="layers of the Qwen2.5-7B-shaped stack (0: skip)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    result = measure(quant_types=[q.strip() for q in args.quant_types.split(",") if q.strip()],
                     qwen_layers=args.qwen_layers, repeats=args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
