"""Decide the mode and what lives on the compute device under a memory budget; print it as a table at start.

`choose_mode` resolves `mode: auto`: speculation pays only when a target forward is far dearer than a draft
step, i.e. when weights must cross PCIe. So `resident` when the whole model fits the device (always on a
CPU, where host memory is the compute memory and nothing would be streamed), `subspec` when layers must
stream. `plan_memory` then places the chosen mode: fixed costs first (shared modules, the draft's
substitutes, the KV cache, activation and tree buffers, the streaming ring); then as many full-precision
decoder layers as still fit stay resident (beyond the paper, which streams them all). A resident layer
needs no substitute: the draft uses the target's own weights there. `plan_for` is how callers plan: the
builder and the benchmarks pass their EngineConfig whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.kv_cache import KVCache, kv_capacity
from subspec_core.quant import substitute_bytes_per_layer
from subspec_core.sampling import PROMPT_SCORE_ROWS, top_p_workspace_bytes
from subspec_core.weights import LayerLayout, ModelShape, shared_nbytes

DEVICE, HOST = "device", "host"  # PlanRow locations: the compute device's memory, or (pinned) host memory


class BudgetTooSmallError(ValueError):
    """The budget cannot hold even the parts that must be on the GPU."""


@dataclass(frozen=True)
class PlanRow:
    component: str
    location: str  # DEVICE or HOST
    nbytes: int
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    rows: tuple[PlanRow, ...]
    budget_bytes: int | None
    device_type: str = "cuda"  # "cuda" or "cpu": how the table names the compute memory
    prefill_chunk_size: int = 256  # prompt tokens per prefill forward (chosen here when the config leaves it unset)
    # Host RAM the weights need at load, at its peak: the streamed layers' arena, one layer being read and the
    # shared weights passing through (on a CPU also everything the device rows hold: it is the same memory).
    host_ram_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.location == DEVICE)

    @property
    def host_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.location == HOST)

    @property
    def device_label(self) -> str:
        return "gpu" if self.device_type == "cuda" else self.device_type

    def table(self) -> str:
        """A fixed-width table of the plan, for the start-up log. The budget line appears only with a budget
        (a GPU); on a CPU the compute memory is labelled "cpu"."""
        label = self.device_label
        lines = [f"{'component':<34} {'where':<6} {'MiB':>10}  detail", "-" * 78]
        for r in self.rows:
            where = label if r.location == DEVICE else HOST
            lines.append(f"{r.component:<34} {where:<6} {r.nbytes / 2**20:>10.1f}  {r.detail}")
        lines.append("-" * 78)
        budget = "" if self.budget_bytes is None else f"budget {self.budget_bytes / 2**20:.1f} MiB"
        lines.append(f"{'device total':<34} {label:<6} {self.device_bytes / 2**20:>10.1f}  {budget}".rstrip())
        streamed = "per target forward" if self.streamed_layers else "nothing streamed"
        lines.append(f"{'streamed from host':<34} {HOST:<6} {self.host_bytes / 2**20:>10.1f}  {streamed}")
        what = "all of the above + one layer" if self.device_type != "cuda" else "streamed layers + one layer + shared"
        lines.append(f"{'host RAM at load (peak)':<34} {HOST:<6} {self.host_ram_bytes / 2**20:>10.1f}  {what}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ModeChoice:
    """The mode the engine runs in, and why (one start-up line)."""

    mode: str
    requested: str
    reason: str

    def line(self) -> str:
        how = "chosen by mode auto" if self.requested == "auto" else "as configured"
        return f"mode {self.mode} ({how}): {self.reason}"


def device_budget(configured: int | None, device: torch.device) -> int | None:
    """The memory budget that applies: on a GPU the configured one, else 90% of its free memory; none on a
    CPU, where host memory is the compute memory (streaming there only demonstrates the mechanism)."""
    if device.type != "cuda":
        return None
    if configured is not None:
        return configured
    return int(torch.cuda.mem_get_info(device)[0] * 0.9)


def choose_mode(
    *, requested: str, device_type: str, num_layers: int, max_resident_layers: int | None, budget_bytes: int | None,
    plan_for: Callable[..., MemoryPlan],
) -> ModeChoice:
    """Resolve `mode: auto`; any other mode is returned as asked (an explicit mode always wins).

    `plan_for(mode=..., budget_bytes=None)` is `plan_for` with the config and shape bound: auto asks it what
    the whole model needs on the device in mode `resident` and compares that with `budget_bytes`.
    """
    if requested != "auto":
        return ModeChoice(requested, requested, "set by --mode, SUBSPEC_MODE or the config file")
    if max_resident_layers is not None and max_resident_layers < num_layers:
        return ModeChoice("subspec", requested, f"max_resident_layers={max_resident_layers} streams "
                          f"{num_layers - max_resident_layers} of {num_layers} decoder layers, and a substitute draft "
                          "is what makes streamed layers fast")
    if device_type != "cuda":
        return ModeChoice("resident", requested, f"on a {device_type.upper()} the weights already sit in the memory "
                          "that computes, so nothing is streamed and speculation cannot pay for its draft")
    need = plan_for(mode="resident", budget_bytes=None).device_bytes
    if budget_bytes is not None and need > budget_bytes:
        return ModeChoice("subspec", requested, f"the whole model needs {_format_bytes(need)} on the GPU with its KV "
                          f"cache, over the {_format_bytes(budget_bytes)} budget: layers stream from host memory and "
                          "the 4-bit substitute draft makes each streamed forward verify many tokens")
    return ModeChoice("resident", requested, f"the whole model fits on the GPU ({_format_bytes(need)} with its KV "
                      f"cache{'' if budget_bytes is None else f', budget {_format_bytes(budget_bytes)}'}), so nothing "
                      "is streamed and plain decoding is fastest")


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(*, shape: ModelShape, dtype: torch.dtype, rows: int, kv_length: int, logit_rows: int | None = None) -> int:
    """Rough peak working memory of one forward over `rows` tokens attending to `kv_length` slots, of which
    `logit_rows` (default: all) get logits at once."""
    b = _dtype_bytes(dtype)
    logit_rows = rows if logit_rows is None else logit_rows
    hidden = rows * (shape.hidden_size * 4 + shape.q_size + 2 * shape.kv_size + 3 * shape.intermediate_size) * b
    scores = rows * shape.num_heads * kv_length * 4  # attention scores if the math kernel materialises them
    # the additive mask, repeated per query head of a kv head (GQA folded into rows): built once per forward
    mask = rows * (shape.num_heads // shape.num_kv_heads) * kv_length * b
    return hidden + scores + mask + logits_bytes(rows=logit_rows, vocab_size=shape.vocab_size)


def logits_bytes(*, rows: int, vocab_size: int) -> int:
    """Choosing tokens from `rows` rows of logits: float32 logits, processed logits and sampling noise, each
    (rows, V), plus top-p's sorting workspace (sampling.py sorts a bounded number of rows at a time)."""
    return rows * vocab_size * 4 * 3 + top_p_workspace_bytes(vocab_size)


# Prefill chunks the planner picks from when the config leaves the size unset: each chunk streams every offloaded
# weight once, so fewer, larger chunks mean fewer weight passes; 256 is the paper's size at 8 GB, 4096 its largest.
MIN_AUTO_PREFILL_CHUNK = 256
MAX_AUTO_PREFILL_CHUNK = 4096


def plan_memory(
    *,
    shape: ModelShape,
    dtype: torch.dtype,
    mode: str,
    speculation: SpeculationConfig,
    max_model_len: int,
    prefill_chunk_size: int | None,
    stream_slots: int,
    budget_bytes: int | None,
    max_resident_layers: int | None,
    shared_bytes: int,
    device_type: str = "cuda",
) -> MemoryPlan:
    """Choose resident and streamed layers; raise BudgetTooSmallError when even the fixed part does not fit.

    `prefill_chunk_size` None: after the layers are placed with the smallest chunk, the chunk grows (powers of
    two, up to max_model_len and MAX_AUTO_PREFILL_CHUNK) as far as the budget's remaining slack allows: a
    larger chunk never costs a resident layer.
    """
    b = _dtype_bytes(dtype)
    layout = LayerLayout.for_shape(shape)
    layer_bytes = layout.numel * b
    speculative = mode == "subspec"
    tree_rows = speculation.verify_size if speculative else 1
    capacity = kv_capacity(max_model_len=max_model_len, tree_slots=speculation.tree_size if speculative else 1)
    kv_bytes = KVCache.bytes_needed(
        num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, capacity=capacity, dtype=dtype
    )
    def work_bytes_for(chunk: int) -> int:
        return max(
            activation_bytes(shape=shape, dtype=dtype, rows=tree_rows, kv_length=capacity),
            # a prefill chunk's logits: its last row, or PROMPT_SCORE_ROWS at a time for prompt logprobs
            activation_bytes(shape=shape, dtype=dtype, rows=min(chunk, max_model_len), kv_length=capacity,
                             logit_rows=min(chunk, max_model_len, PROMPT_SCORE_ROWS)),
        )

    chunk = prefill_chunk_size or min(MIN_AUTO_PREFILL_CHUNK, max_model_len)
    work_bytes = work_bytes_for(chunk)
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
    if prefill_chunk_size is None:
        largest = min(max_model_len, MAX_AUTO_PREFILL_CHUNK)
        candidates = sorted({largest} | {c for c in (2**p for p in range(8, 13)) if chunk < c < largest})
        for bigger in candidates:
            extra = work_bytes_for(bigger) - work_bytes
            if budget_bytes is not None and device_total(resident) + extra > budget_bytes:
                break
            chunk, work_bytes, fixed = bigger, work_bytes + extra, fixed + extra
    host_memory = "pinned" if device_type == "cuda" else "copied in per forward"
    resident_ids = tuple(range(resident))
    streamed_ids = tuple(range(resident, num_layers))
    rows = [
        PlanRow("shared: embeddings, norms, lm_head", DEVICE, shared_bytes, "shared by target and draft"),
        PlanRow("KV cache", DEVICE, kv_bytes, f"{capacity} slots = max_model_len + tree (aligned), shared" if speculative
                else f"{capacity} slots = max_model_len + 1 (aligned)"),
        PlanRow("activations + logits buffers", DEVICE, work_bytes,
                f"{'verify' if speculative else 'decode'} {tree_rows} row{'s' * (tree_rows != 1)} / prefill chunk "
                f"{chunk}{' (auto)' if prefill_chunk_size is None else ''}"),
    ]
    if speculative:
        rows.append(PlanRow("tree masks", DEVICE, tree_bytes, f"depth {speculation.max_depth} x topk {speculation.topk}"))
        rows.append(
            PlanRow(
                f"draft substitutes ({speculation.quant_type})", DEVICE, len(streamed_ids) * sub_bytes,
                f"{len(streamed_ids)} streamed layers, block {speculation.quant_block_size}",
            )
        )
    rows.append(PlanRow("resident decoder layers", DEVICE, resident * layer_bytes, f"{resident} of {num_layers} layers, full precision"))
    if streamed_ids:
        rows.append(PlanRow("streaming ring", DEVICE, stream_slots * layer_bytes, f"{stream_slots} layer slots"))
        rows.append(PlanRow("streamed decoder layers", HOST, len(streamed_ids) * layer_bytes,
                               f"layers {streamed_ids[0]}..{streamed_ids[-1]}, {host_memory}"))
    plan = MemoryPlan(resident_layers=resident_ids, streamed_layers=streamed_ids, rows=tuple(rows), budget_bytes=budget_bytes,
                      device_type=device_type, prefill_chunk_size=chunk)
    return dataclasses.replace(plan, host_ram_bytes=host_ram_at_load(plan, layer_bytes=layer_bytes, shared_bytes=shared_bytes))


def plan_for(
    config: EngineConfig, shape: ModelShape, *, dtype: torch.dtype, device_type: str, budget_bytes: int | None,
    mode: str | None = None,
) -> MemoryPlan:
    """`plan_memory` for `config` on a model of `shape`: how the engine builder and every benchmark plan.

    `mode` defaults to the config's, which must be chosen by then (`choose_mode` asks about other modes).
    """
    mode = config.mode if mode is None else mode
    if mode == "auto":
        raise ValueError("mode auto has no plan: choose_mode picks the mode first")
    return plan_memory(
        shape=shape, dtype=dtype, mode=mode, speculation=config.speculation, max_model_len=config.max_model_len,
        prefill_chunk_size=config.prefill_chunk_size, stream_slots=config.stream_slots, budget_bytes=budget_bytes,
        max_resident_layers=config.max_resident_layers, shared_bytes=shared_nbytes(shape, dtype),
        device_type=device_type,
    )


def host_ram_at_load(plan: MemoryPlan, *, layer_bytes: int, shared_bytes: int) -> int:
    """Host RAM the weights need while loading in one pass per layer: the arena of streamed layers, one layer
    being read and the shared weights on their way to the device. On a CPU the device rows are host memory too."""
    if plan.device_type == "cuda":
        return plan.host_bytes + layer_bytes + shared_bytes
    return plan.device_bytes + plan.host_bytes + layer_bytes
