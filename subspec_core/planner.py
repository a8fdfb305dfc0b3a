"""Decide what lives on the GPU under a memory budget, and print it as a table at start.

Fixed costs first (shared modules, the draft's substitutes, the KV cache, activation and tree buffers, the
streaming ring); then as many full-precision decoder layers as still fit stay resident (beyond the paper,
which streams them all). A resident layer needs no substitute: the draft uses the target's own weights there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subspec_core.config import SpeculationConfig
from subspec_core.kv_cache import KVCache, kv_capacity
from subspec_core.quant import substitute_bytes_per_layer
from subspec_core.weights import LayerLayout, ModelShape


class BudgetTooSmallError(ValueError):
    """The budget cannot hold even the parts that must be on the GPU."""


@dataclass(frozen=True)
class PlanRow:
    component: str
    location: str  # "gpu" or "host"
    nbytes: int
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    rows: tuple[PlanRow, ...]
    budget_bytes: int | None

    @property
    def device_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.location == "gpu")

    @property
    def host_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.location == "host")

    def table(self) -> str:
        """A fixed-width table of the plan, for the start-up log."""
        lines = [f"{'component':<34} {'where':<6} {'MiB':>10}  detail", "-" * 78]
        for r in self.rows:
            lines.append(f"{r.component:<34} {r.location:<6} {r.nbytes / 2**20:>10.1f}  {r.detail}")
        lines.append("-" * 78)
        budget = "unlimited" if self.budget_bytes is None else f"{self.budget_bytes / 2**20:.1f} MiB"
        lines.append(f"{'device total':<34} {'gpu':<6} {self.device_bytes / 2**20:>10.1f}  budget {budget}")
        lines.append(f"{'streamed from host':<34} {'host':<6} {self.host_bytes / 2**20:>10.1f}  per target forward")
        return "\n".join(lines)


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(*, shape: ModelShape, dtype: torch.dtype, rows: int, kv_length: int) -> int:
    """Rough peak working memory of one forward over `rows` tokens attending to `kv_length` slots."""
    b = _dtype_bytes(dtype)
    hidden = rows * (shape.hidden_size * 4 + shape.q_size + 2 * shape.kv_size + 3 * shape.intermediate_size) * b
    scores = rows * shape.num_heads * kv_length * 4  # attention scores if the math kernel materialises them
    # the additive mask, repeated per query head of a kv head (GQA folded into rows): built once per forward
    mask = rows * (shape.num_heads // shape.num_kv_heads) * kv_length * b
    logits = rows * shape.vocab_size * 4 * 3  # float32 logits, processed logits, sampling noise
    return hidden + scores + mask + logits


def plan_memory(
    *,
    shape: ModelShape,
    dtype: torch.dtype,
    mode: str,
    speculation: SpeculationConfig,
    max_model_len: int,
    prefill_chunk_size: int,
    stream_slots: int,
    budget_bytes: int | None,
    max_resident_layers: int | None,
    shared_bytes: int,
) -> MemoryPlan:
    """Choose resident and streamed layers; raise BudgetTooSmallError when even the fixed part does not fit."""
    b = _dtype_bytes(dtype)
    layout = LayerLayout.for_shape(shape)
    layer_bytes = layout.numel * b
    speculative = mode == "subspec"
    tree_rows = speculation.verify_size if speculative else 1
    capacity = kv_capacity(max_model_len=max_model_len, tree_slots=speculation.tree_size if speculative else 1)
    kv_bytes = KVCache.bytes_needed(
        num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, capacity=capacity, dtype=dtype
    )
    work_bytes = max(
        activation_bytes(shape=shape, dtype=dtype, rows=tree_rows, kv_length=capacity),
        activation_bytes(shape=shape, dtype=dtype, rows=min(prefill_chunk_size, max_model_len), kv_length=capacity),
    )
    tree_bytes = tree_rows * tree_rows + speculation.tree_size**2 if speculative else 0  # ancestor matrices
    out_rows = shape.q_size + 2 * shape.kv_size + shape.hidden_size + 2 * shape.intermediate_size + shape.hidden_size
    sub_bytes = (
        substitute_bytes_per_layer(
            shape.linear_params_per_layer, out_rows, quant_type=speculation.quant_type, block_size=speculation.quant_block_size
        )
        if speculative
        else 0
    )
    fixed = shared_bytes + kv_bytes + work_bytes + tree_bytes
    num_layers = shape.num_layers
    cap = num_layers if max_resident_layers is None else min(num_layers, max_resident_layers)
    if mode == "resident":
        cap = num_layers

    def device_total(resident: int) -> int:
        streamed = num_layers - resident
        ring = stream_slots * layer_bytes if streamed else 0
        return fixed + resident * layer_bytes + streamed * sub_bytes + ring

    resident = cap
    if budget_bytes is not None:
        while resident > 0 and device_total(resident) > budget_bytes:
            resident -= 1
        if device_total(resident) > budget_bytes or (mode == "resident" and resident < num_layers):
            # the cheapest plan is not always all-streamed: the ring is only needed while a layer streams
            need = device_total(num_layers) if mode == "resident" else min(device_total(r) for r in range(cap + 1))
            raise BudgetTooSmallError(
                f"gpu_memory_budget {_format_bytes(budget_bytes)} is too small for mode {mode!r}: it needs at least "
                f"{_format_bytes(need)} (shared modules, KV cache for max_model_len={max_model_len}, buffers"
                f"{', 4-bit substitutes' if speculative else ''}); raise the budget or lower max_model_len"
            )
    resident_ids = tuple(range(resident))
    streamed_ids = tuple(range(resident, num_layers))
    rows = [
        PlanRow("shared: embeddings, norms, lm_head", "gpu", shared_bytes, "shared by target and draft"),
        PlanRow("KV cache", "gpu", kv_bytes, f"{capacity} slots = max_model_len + tree (aligned), shared"),
        PlanRow("activations + logits buffers", "gpu", work_bytes, f"verify {tree_rows} rows / prefill chunk {prefill_chunk_size}"),
    ]
    if speculative:
        rows.append(PlanRow("tree masks", "gpu", tree_bytes, f"depth {speculation.max_depth} x topk {speculation.topk}"))
        rows.append(
            PlanRow(
                f"draft substitutes ({speculation.quant_type})", "gpu", len(streamed_ids) * sub_bytes,
                f"{len(streamed_ids)} streamed layers, block {speculation.quant_block_size}",
            )
        )
    rows.append(PlanRow("resident decoder layers", "gpu", resident * layer_bytes, f"{resident} of {num_layers} layers, full precision"))
    if streamed_ids:
        rows.append(PlanRow("streaming ring", "gpu", stream_slots * layer_bytes, f"{stream_slots} layer slots"))
        rows.append(PlanRow("streamed decoder layers", "host", len(streamed_ids) * layer_bytes, f"layers {streamed_ids[0]}..{streamed_ids[-1]}, pinned"))
    return MemoryPlan(resident_layers=resident_ids, streamed_layers=streamed_ids, rows=tuple(rows), budget_bytes=budget_bytes)
