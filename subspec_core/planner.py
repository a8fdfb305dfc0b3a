"""Decide the mode and what lives on the compute device under a memory budget; print it as a table at start.

`choose_mode` resolves `mode: auto`: speculation pays only when a target forward is far dearer than a draft
step, i.e. when weights must cross PCIe. So `resident` when the whole model fits the device (always on a
CPU, where host memory is the compute memory and nothing would be streamed), `subspec` when layers must
stream. `plan_memory` then places the chosen mode: fixed costs first (shared modules, the draft's
substitutes, the KV cache, activation and tree buffers, the streaming ring, and the reserves of `reserves.py`:
the CUDA context, library workspaces, the draft's graph pool, the sampling peak, load temporaries and a
fragmentation margin); then as many full-precision decoder layers as still fit stay resident (beyond the
paper, which streams them all). A resident layer needs no substitute: the draft uses the target's own weights
there. With `max_num_seqs: auto` the sequences decoded together come last: as many as the memory left after the
layers holds, up to AUTO_MAX_NUM_SEQS (an explicit count is placed before the layers instead, which give way to
it). `plan_for` is how callers plan: the builder and the benchmarks pass their EngineConfig whole.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.errors import SetupError
from subspec_core.kv_cache import kv_capacity
from subspec_core.reserves import (
    CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, WORKING_SET_FRAGMENTATION, MiB, PlanSizes, logits_buffer_bytes,
    plan_sizes,
)
from subspec_core.sampling import sampling_peak_bytes
from subspec_core.weights import ModelShape, shared_nbytes

DEVICE, HOST = "device", "host"  # PlanRow locations: the compute device's memory, or (pinned) host memory
CUDA_CONTEXT_ROW = "CUDA context"
KV_CACHE_ROW = "KV cache"


class BudgetTooSmallError(SetupError, ValueError):
    """The budget cannot hold even the parts that must be on the GPU."""


@dataclass(frozen=True)
class PlanRow:
    component: str
    location: str  # DEVICE or HOST
    nbytes: int
    detail: str = ""
    reserve: bool = False  # not the model's tensors: the CUDA context, workspaces, peaks and margins (reserves.py)


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
    max_num_seqs: int = 1  # sequences decoded together, each with a KV region (config.max_num_seqs, resolved)
    # with a budget: the most sequences the same resident layers and prefill chunk leave room for (capped at
    # MAX_SEQS_PROBED); None without a budget
    seqs_that_fit: int | None = None
    seqs_reason: str = "as configured"  # how max_num_seqs was chosen (the plan's sequences line)

    @property
    def device_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.location == DEVICE)

    @property
    def reserve_bytes(self) -> int:
        """The device bytes that are not the model's tensors or buffers (the reserve rows)."""
        return sum(r.nbytes for r in self.rows if r.location == DEVICE and r.reserve)

    @property
    def context_bytes(self) -> int:
        """The CUDA context's reserve: it exists once `torch.cuda.mem_get_info` answers, so free memory excludes it."""
        return sum(r.nbytes for r in self.rows if r.component == CUDA_CONTEXT_ROW)

    @property
    def host_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.location == HOST)

    @property
    def kv_bytes(self) -> int:
        """The KV cache of every sequence's region."""
        return sum(r.nbytes for r in self.rows if r.component == KV_CACHE_ROW)

    def seqs_line(self) -> str:
        """One line: the sequences decoded together, their KV cost and why that many (start-up log, `subspec plan`)."""
        fits = "" if self.seqs_that_fit is None else f"; the budget holds up to {self.seqs_that_fit} at these layers"
        return (f"max_num_seqs {self.max_num_seqs} ({self.seqs_reason}): KV cache {self.kv_bytes / 2**20:.1f} MiB, "
                f"{self.kv_bytes / self.max_num_seqs / 2**20:.1f} MiB per sequence{fits}")

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
        budget = "" if self.budget_bytes is None else f"budget {self.budget_bytes / 2**20:.1f} MiB, "
        total = f"{budget}reserves {self.reserve_bytes / 2**20:.1f} MiB"
        lines.append(f"{'device total':<34} {label:<6} {self.device_bytes / 2**20:>10.1f}  {total}")
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
    """The memory budget that applies: on a GPU the configured one, else its free memory with the CUDA context's
    reserve (the context exists once `mem_get_info` answers, and the plan counts it); none on a CPU, where host
    memory is the compute memory (streaming there only demonstrates the mechanism)."""
    if device.type != "cuda":
        return None
    if configured is not None:
        return configured
    return int(torch.cuda.mem_get_info(device)[0]) + CUDA_CONTEXT_BYTES


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
        return ModeChoice("subspec", requested, f"the whole model needs {format_bytes(need)} on the GPU with its KV "
                          f"cache and reserves, over the {format_bytes(budget_bytes)} budget: layers stream from host "
                          "memory and the 4-bit substitute draft makes each streamed forward verify many tokens")
    budget = "" if budget_bytes is None else f", budget {format_bytes(budget_bytes)}"
    return ModeChoice("resident", requested, f"the whole model fits on the GPU ({format_bytes(need)} with its KV "
                      f"cache and reserves{budget}), so nothing is streamed and plain decoding is fastest")


def format_bytes(n: int) -> str:
    """Bytes as GiB from 1 GiB, else MiB (the plan's messages)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def logits_bytes(*, rows: int, vocab_size: int, positions: int | None = None) -> int:
    """Choosing tokens from `rows` rows of logits at `positions` positions (default: as many as rows): the logits
    (lm_head's output and its float32 copy) and what sampling and logprobs take beyond them (sampling.py sorts
    a bounded number of rows at a time for top-p)."""
    positions = rows if positions is None else positions
    return logits_buffer_bytes(rows=rows, vocab_size=vocab_size) + sampling_peak_bytes(
        rows=rows, positions=positions, vocab_size=vocab_size)


# Prefill chunks the planner picks from when the config leaves the size unset: each chunk streams every offloaded
# weight once, so fewer, larger chunks mean fewer weight passes; 256 is the paper's size at 8 GB, 4096 its largest.
MIN_AUTO_PREFILL_CHUNK = 256
MAX_SEQS_PROBED = 64  # MemoryPlan.seqs_that_fit looks no further
MAX_AUTO_PREFILL_CHUNK = 4096
# max_num_seqs auto stops here: by estimate a consumer GPU's verify forward of a 7B model stays bound by the weight
# stream up to about 5-11 trees of ~200-300 rows (issue #20); past that, rows cost compute and a sequence more
# mostly adds memory and latency for the others
AUTO_MAX_NUM_SEQS = 8


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
    cuda_graphs: bool = True,
    max_num_seqs: int | None = 1,
) -> MemoryPlan:
    """Choose resident and streamed layers; raise BudgetTooSmallError when even the fixed part does not fit.

    The budget holds everything the process keeps on the device: tensors and the reserves (`reserves.py`).
    `max_num_seqs` sequences each hold a KV region of `capacity` slots and one verify forward carries all their
    trees (batch.py). A count is placed first, and resident layers give way to it; None (auto) places the layers
    for one sequence, then adds sequences while the budget's slack holds them, up to AUTO_MAX_NUM_SEQS
    (`auto_num_seqs`). `prefill_chunk_size` None: after that, the chunk grows (powers of two, up to max_model_len
    and MAX_AUTO_PREFILL_CHUNK) as far as the remaining slack allows: a larger chunk never costs a resident layer
    or a sequence.
    """
    speculative = mode == "subspec"
    capacity = kv_capacity(max_model_len=max_model_len, tree_slots=speculation.tree_slots if speculative else 1)
    seqs = 1 if max_num_seqs is None else max_num_seqs

    def sizes_for(chunk: int, seqs: int) -> PlanSizes:
        return plan_sizes(shape=shape, dtype=dtype, mode=mode, speculation=speculation, capacity=capacity, chunk=chunk,
                          max_model_len=max_model_len, stream_slots=stream_slots, shared_bytes=shared_bytes,
                          device_type=device_type, cuda_graphs=cuda_graphs, max_num_seqs=seqs)

    chunk = prefill_chunk_size or min(MIN_AUTO_PREFILL_CHUNK, max_model_len)
    sizes = sizes_for(chunk, seqs)
    num_layers = shape.num_layers
    cap = num_layers if max_resident_layers is None else min(num_layers, max_resident_layers)
    if mode == "resident":
        cap = num_layers

    def device_total(resident: int, s: PlanSizes) -> int:
        return s.device_total(resident, num_layers - resident, device_type=device_type)

    resident = cap
    if budget_bytes is not None:
        while resident > 0 and device_total(resident, sizes) > budget_bytes:
            resident -= 1
        if device_total(resident, sizes) > budget_bytes or (mode == "resident" and resident < num_layers):
            # the cheapest plan is not always all-streamed: the ring is only needed while a layer streams
            need = (device_total(num_layers, sizes) if mode == "resident"
                    else min(device_total(r, sizes) for r in range(cap + 1)))
            raise BudgetTooSmallError(
                f"gpu_memory_budget {format_bytes(budget_bytes)} is too small for mode {mode!r}: it needs at least "
                f"{format_bytes(need)} (shared modules, KV cache for max_model_len={max_model_len} x max_num_seqs="
                f"{seqs}, buffers"
                f"{', 4-bit substitutes' if speculative else ''}, reserves); raise the budget or lower max_model_len"
                + (" or max_num_seqs" if seqs > 1 else "")
            )

    def fits(chunk: int, seqs: int) -> bool:
        return budget_bytes is None or device_total(resident, sizes_for(chunk, seqs)) <= budget_bytes

    reason = "as configured"
    if max_num_seqs is None:
        seqs, reason = auto_num_seqs(mode=mode, budget_bytes=budget_bytes, post_levels=speculation.post_levels,
                                     fits=functools.partial(fits, chunk))
        sizes = sizes_for(chunk, seqs)
    if prefill_chunk_size is None:
        largest = min(max_model_len, MAX_AUTO_PREFILL_CHUNK)
        candidates = sorted({largest} | {c for c in (2**p for p in range(8, 13)) if chunk < c < largest})
        for bigger in candidates:
            if not fits(bigger, seqs):
                break
            chunk, sizes = bigger, sizes_for(bigger, seqs)
    streamed_ids = tuple(range(resident, num_layers))
    rows = _rows(sizes, resident=resident, streamed_ids=streamed_ids, shape=shape, mode=mode, speculation=speculation,
                 capacity=capacity, chunk=chunk, chunk_auto=prefill_chunk_size is None, device_type=device_type,
                 max_num_seqs=seqs)
    fit = None
    if budget_bytes is not None:  # sequences grow the KV, activations and tree rows: the first count that does not fit
        fit = seqs
        while fit < MAX_SEQS_PROBED and fits(chunk, fit + 1):
            fit += 1
    plan = MemoryPlan(resident_layers=tuple(range(resident)), streamed_layers=streamed_ids, rows=tuple(rows),
                      budget_bytes=budget_bytes, device_type=device_type, prefill_chunk_size=chunk,
                      max_num_seqs=seqs, seqs_that_fit=fit, seqs_reason=reason)
    host_ram = host_ram_at_load(plan, layer_bytes=sizes.layer, shared_bytes=shared_bytes)
    return dataclasses.replace(plan, host_ram_bytes=host_ram)


def auto_num_seqs(*, mode: str, budget_bytes: int | None, post_levels: int,
                  fits: Callable[[int], bool]) -> tuple[int, str]:
    """max_num_seqs auto, once the layers are placed for one sequence: the most sequences (up to AUTO_MAX_NUM_SEQS)
    for which `fits(count)` holds, and why, in a few words. One where batching is not the better default: without
    a budget (a CPU: host memory is the compute memory, and nothing bounds it but the machine), with
    post-speculation (Engine.batch_decoder: it decodes one request at a time), and in mode resident, where nothing
    streams to share and a lone request's one-token step replays CUDA graphs that the batched step has not."""
    if post_levels > 0:
        return 1, "auto: post-speculation decodes one request at a time"
    if mode == "resident":
        return 1, ("auto: nothing streams to share in mode resident, and a lone request's step is a CUDA graph; "
                   "--max-num-seqs N decodes N together")
    if budget_bytes is None:
        return 1, "auto: no memory budget to size more from, as on a CPU; --max-num-seqs N decodes N together"
    count = 1
    while count < AUTO_MAX_NUM_SEQS and fits(count + 1):
        count += 1
    return count, f"auto: as many as the budget left after the layers holds, up to {AUTO_MAX_NUM_SEQS}"


def _rows(s: PlanSizes, *, resident: int, streamed_ids: tuple[int, ...], shape: ModelShape, mode: str,
          speculation: SpeculationConfig, capacity: int, chunk: int, chunk_auto: bool,
          device_type: str, max_num_seqs: int = 1) -> list[PlanRow]:
    """The plan's table rows: tensors first, then the reserves (PlanRow.reserve)."""
    speculative = mode == "subspec"
    streamed = len(streamed_ids)
    num_layers = shape.num_layers
    tree_rows = (speculation.verify_size if speculative else 1) * max_num_seqs  # one verify carries every sequence's
    slots = (f"{capacity} slots = max_model_len + tree (aligned), shared" if speculative
             else f"{capacity} slots = max_model_len + 1 (aligned)")
    seqs = "" if max_num_seqs == 1 else f"max_num_seqs {max_num_seqs} x "
    per_seq = tree_rows // max_num_seqs
    rows = [
        PlanRow("shared: embeddings, norms, lm_head", DEVICE, s.shared, "shared by target and draft"),
        PlanRow(KV_CACHE_ROW, DEVICE, s.kv, seqs + slots),
        PlanRow("activations + logits buffers", DEVICE, s.work,
                f"{'verify' if speculative else 'decode'} {tree_rows} row{'s' * (tree_rows != 1)} / prefill chunk "
                f"{chunk}{' (auto)' if chunk_auto else ''}"),
    ]
    if speculative:
        rows.append(PlanRow("tree masks", DEVICE, s.tree,
                            f"{seqs}depth {speculation.max_depth} x topk {speculation.topk}"))
        rows.append(PlanRow(f"draft substitutes ({speculation.quant_type})", DEVICE, streamed * s.substitute,
                            f"{streamed} streamed layers, block {speculation.quant_block_size}"))
    rows.append(PlanRow("resident decoder layers", DEVICE, resident * s.layer,
                        f"{resident} of {num_layers} layers, full precision"))
    if streamed:
        rows.append(PlanRow("streaming ring", DEVICE, s.ring, f"{s.ring // s.layer} layer slots"))
    cuda = device_type == "cuda"
    if cuda:
        rows.append(PlanRow(CUDA_CONTEXT_ROW, DEVICE, s.context, "driver, kernels, lazy module loading", reserve=True))
        streams = s.workspaces // CUBLAS_WORKSPACE_BYTES
        rows.append(PlanRow("library workspaces", DEVICE, s.workspaces,
                            f"cuBLAS {CUBLAS_WORKSPACE_BYTES // MiB} MiB x {streams} stream{'s' * (streams != 1)}",
                            reserve=True))
        if s.graph_pool:
            what = (f"level step ({speculation.topk} rows over {capacity} slots) + its warm-up"
                    + (" + the post-speculation stream's" if speculation.post_levels else "")
                    + (f" + the batched level's ({speculation.topk * max_num_seqs} rows) + its warm-up"
                       if max_num_seqs > 1 else "") if speculative
                    else f"one-token step (1 row over {capacity} slots) + its warm-up")
            rows.append(PlanRow("draft CUDA-graph pool" if speculative else "step CUDA-graph pool", DEVICE,
                                s.graph_pool, what, reserve=True))
    rows.append(PlanRow("sampling + logprobs peak", DEVICE, s.sampling,
                        f"beyond the logits: {per_seq} row{'s' * (per_seq != 1)} sampled (one sequence at a time) "
                        "/ prompt logprobs",
                        reserve=True))
    if speculative and streamed:
        working = s.quantize / MiB
        rows.append(PlanRow("load temporaries", DEVICE, s.load_temporaries(streamed),
                            f"quantizing {s.quantized} one linear at a time: {working:.0f} MiB, less what the ring, KV "
                            "cache and working rows reuse", reserve=True))
    if cuda:
        rows.append(PlanRow("fragmentation margin", DEVICE, s.fragmentation(resident, streamed, device_type=device_type),
                            f"segment rounding + {WORKING_SET_FRAGMENTATION:.1%} of the working rows",
                            reserve=True))
    if streamed_ids:
        host_memory = "pinned" if cuda else "copied in per forward"
        rows.append(PlanRow("streamed decoder layers", HOST, streamed * s.layer,
                            f"layers {streamed_ids[0]}..{streamed_ids[-1]}, {host_memory}"))
    return rows


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
        device_type=device_type, cuda_graphs=config.cuda_graphs, max_num_seqs=config.requested_num_seqs,
    )


def host_ram_at_load(plan: MemoryPlan, *, layer_bytes: int, shared_bytes: int) -> int:
    """Host RAM the weights need while loading in one pass per layer: the arena of streamed layers, one layer
    being read and the shared weights on their way to the device. On a CPU the device rows are host memory too."""
    if plan.device_type == "cuda":
        return plan.host_bytes + layer_bytes + shared_bytes
    return plan.device_bytes + plan.host_bytes + layer_bytes
