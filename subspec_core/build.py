"""Building an engine: device and dtype, the model's shape, the mode and the memory plan, then one pass over the
weights that puts every layer where the plan says, and the draft's CUDA graphs.

`build_engine(config)` reads a checkpoint; `engine_from_weights(config, weights)` places weights already in
memory (tests and benchmarks with random weights). Both end in `_place`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from subspec_core.config import EngineConfig, config_as_dict
from subspec_core.copies import make_copies
from subspec_core.engine import Engine, LoadedModel
from subspec_core.fit import fit_device
from subspec_core.hardware import DeviceInfo
from subspec_core.kv_cache import kv_capacity, kv_regions
from subspec_core.loading import open_model
from subspec_core.model_source import resolve_model
from subspec_core.offload import place_layers
from subspec_core.planner import MemoryPlan, choose_mode, device_budget, plan_for
from subspec_core.quant import DraftLayers, QuantizedLinears, substitute_quant_type
from subspec_core.startup import StartupLog
from subspec_core.step_graphs import StepGraphs
from subspec_core.weights import LayerLayout, ModelShape, SharedWeights

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(config: EngineConfig) -> torch.device:
    """cuda when asked or available (auto), else cpu; asking for cuda without one is an error."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device (install a CUDA build of torch)")
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on the GPU (fp16's range is risky for cumulative activations), float32 on the CPU."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class WeightSource(Protocol):
    """What `_place` reads a model from: a checkpoint (`loading.ModelReader`) or `InMemoryWeights`."""

    shape: ModelShape
    tokenizer: Any
    eos_token_ids: frozenset[int]
    source: str  # where the weights come from, for the start-up line

    def read_shared(self, dtype: torch.dtype, device: torch.device) -> SharedWeights: ...
    def fill_layer(self, layer: int, out: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class InMemoryWeights:
    """Fused weights already in host memory, as `loading.extract_weights` or random generators give them."""

    shape: ModelShape
    shared: SharedWeights
    layer_linears: list[dict[str, torch.Tensor]]
    tokenizer: Any
    eos_token_ids: frozenset[int] = frozenset()
    source: str = "memory"

    @property
    def dtype(self) -> torch.dtype:
        return self.layer_linears[0]["qkv_weight"].dtype

    def read_shared(self, dtype: torch.dtype, device: torch.device) -> SharedWeights:
        return self.shared.to(device)

    def fill_layer(self, layer: int, out: dict[str, torch.Tensor]) -> None:
        for name, view in out.items():
            view.copy_(self.layer_linears[layer][name])


def build_engine(config: EngineConfig, *, progress: bool = True, phases: StartupLog | None = None) -> Engine:
    """Open the target, choose the mode (resolving `auto`) and plan device memory from its config alone, then
    read its weights in one pass (`_place`). Host memory peaks at about the arena plus one layer plus the shared
    weights. Each start-up phase is reported in one line to `phases`."""
    log.info("engine config: %s", config_as_dict(config))
    phases = phases if phases is not None else StartupLog()
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    with phases.phase("fetch") as phase:
        resolved = resolve_model(config.model, config.gguf_file, progress=progress, check_hub=True)
        phase.detail = resolved.describe()
    reader = open_model(config, dtype, resolved, phases)
    budget = device_budget(config.budget_bytes, device)
    choice = choose_mode(
        requested=config.mode, device_type=device.type, num_layers=reader.shape.num_layers,
        max_resident_layers=config.max_resident_layers, budget_bytes=budget,
        plan_for=functools.partial(plan_for, config, reader.shape, dtype=dtype, device_type=device.type),
    )
    phases.note(choice.line())
    config = dataclasses.replace(config, mode=choice.mode)
    plan = plan_for(config, reader.shape, dtype=dtype, device_type=device.type, budget_bytes=budget)
    plan = fit_device(config, reader.shape, plan, dtype=dtype, device=device, note=phases.note)
    phases.note(plan.seqs_line())
    log.info("memory plan (%s on %s, %s):\n%s", config.mode, device, dtype, plan.table())
    name = config.served_model_name or resolved.display_name
    return _place(config, reader, plan=plan, dtype=dtype, device=device, model_name=name, progress=progress,
                  phases=phases)


def engine_from_weights(config: EngineConfig, weights: InMemoryWeights, *, device: torch.device,
                        model_name: str | None = None, progress: bool = False) -> Engine:
    """Plan for `config` (its mode chosen, not auto) under the device's budget and place `weights` by that plan."""
    plan = plan_for(config, weights.shape, dtype=weights.dtype, device_type=device.type,
                    budget_bytes=device_budget(config.budget_bytes, device))
    plan = fit_device(config, weights.shape, plan, dtype=weights.dtype, device=device, note=log.info)
    return _place(config, weights, plan=plan, dtype=weights.dtype, device=device,
                  model_name=model_name or config.served_model_name or config.model, progress=progress,
                  phases=StartupLog(emit=log.debug))


def _place(config: EngineConfig, weights: WeightSource, *, plan: MemoryPlan, dtype: torch.dtype, device: torch.device,
           model_name: str, progress: bool, phases: StartupLog) -> Engine:
    """One pass over the layers: each is written once where `plan` puts it, and in mode subspec a streamed
    layer's substitute is quantized from its arena slot right away, so no second host copy exists."""
    shape, hardware = weights.shape, DeviceInfo.of(device)
    speculative = config.mode == "subspec"
    quant_type, fallback = substitute_quant_type(config.speculation.quant_type, device_type=device.type,
                                                 capability=hardware.capability)
    if speculative and fallback:
        phases.note(fallback)
        config = dataclasses.replace(config, speculation=dataclasses.replace(config.speculation, quant_type=quant_type))
    spec = config.speculation
    if speculative and not plan.streamed_layers:
        log.warning("every layer is resident: the draft equals the target; mode 'resident' is faster")
    substitutes: dict[int, QuantizedLinears] = {}
    quantize_s = 0.0

    def quantize(layer: int, linears: dict[str, torch.Tensor]) -> None:
        nonlocal quantize_s
        started = time.perf_counter()
        substitutes[layer] = QuantizedLinears(linears, quant_type=spec.quant_type, block_size=spec.quant_block_size,
                                              device=device)
        quantize_s += time.perf_counter() - started

    started = time.perf_counter()
    shared = weights.read_shared(dtype, device)
    copies = functools.partial(make_copies, device=device, num_slots=config.stream_slots,
                               simulate_link_gbps=config.simulate_link_gbps,
                               simulate_link_jitter_s=config.simulate_link_jitter_s)
    target_layers = place_layers(
        fill_layer=weights.fill_layer, num_layers=shape.num_layers, layout=LayerLayout.for_shape(shape), dtype=dtype,
        resident_ids=plan.resident_layers, device=device, num_slots=config.stream_slots,
        on_streamed=quantize if speculative else None, progress=progress, copies=copies,
    )
    if device.type == "cuda":  # give the quantization temporaries back before the ring and KV cache are allocated
        torch.cuda.empty_cache()
    phases.record("place", time.perf_counter() - started - quantize_s,
                  f"shared weights and {shape.num_layers} layers read once from {weights.source}: "
                  f"{len(plan.resident_layers)} resident on {device.type}, {len(plan.streamed_layers)} streamed")
    draft_layers = None
    if speculative:
        phases.record("quantize", quantize_s,
                      f"{spec.quant_type} substitutes of {len(substitutes)} streamed layers (the draft)")
        draft_layers = DraftLayers(resident=target_layers.resident, substitutes=substitutes)
    else:
        phases.skipped("quantize", f"mode {config.mode} has no draft")
    regions = kv_regions(
        num_seqs=plan.max_num_seqs, num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, dtype=dtype,
        capacity=kv_capacity(max_model_len=config.max_model_len, tree_slots=spec.tree_slots if speculative else 1),
        device=device,
    )
    kv_cache = regions[0]
    engine = Engine(config, LoadedModel(
        shape=shape, shared=shared, target_layers=target_layers, draft_layers=draft_layers, kv_cache=kv_cache,
        plan=plan, device=device, hardware=hardware, tokenizer=weights.tokenizer, eos_token_ids=weights.eos_token_ids,
        model_name=model_name, kv_regions=regions,
    ))
    if engine.drafter is None and config.cuda_graphs and device.type == "cuda":
        with torch.inference_mode(), phases.phase("graphs") as phase:
            graphs = StepGraphs(shape=shape, shared=shared, kv_cache=kv_cache, layers=target_layers,
                                backend=engine.attention.draft_level, device=device)
            graphed = graphs.capture()
            engine.step_graphs = graphs if graphed else None
            if graphed:  # the graphed step attends masked over its bucket, with the masked calls' kernel
                engine.attention = dataclasses.replace(engine.attention, one_token_step=engine.attention.draft_level)
            phase.detail = (f"one-token step captured per layer for {len(graphs.lengths)} attention lengths "
                            f"{list(graphs.lengths)}" if graphed else "capture failed: eager one-token step")
    if engine.drafter is not None and config.cuda_graphs and device.type == "cuda":
        with torch.inference_mode(), phases.phase("graphs") as phase:
            graphed = engine.drafter.capture_cuda_graphs()
            lengths = engine.drafter.bucket_lengths
            phase.detail = (f"draft root and level steps captured for {len(lengths)} attention lengths {list(lengths)}"
                            if graphed else "capture failed: eager drafting")
    phases.note(engine.attention.line())
    return engine
