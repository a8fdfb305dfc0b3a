"""The streamed target: layer weights in pinned host memory, copied into a ring of reused GPU buffers.

Ordering (CUDA): a dedicated copy stream fills ring slot s with the next layer, then records `filled[s]`;
the compute stream waits on `filled[s]` before reading the slot and records `free[s]` after the layer's
last kernel; the copy stream waits on `free[s]` before overwriting it. No host synchronisation anywhere.
Layers are consumed in the same cyclic order every forward, so the copy of the next forward's first
layers is issued as soon as slots free up: it overlaps drafting and bookkeeping between forwards.

Those copies and waits go through a copy engine (copies.py): CUDA's stream and events, or on a CPU a
simulated link (a copy thread at a set bandwidth, the events as sequence counters) or plain synchronous
copies. The ring's code is the same over all three, so CI runs the GPU's ordering with real waits.

Teardown runs in the reverse order of the data's path: wait for the copies (none may still write a slot or
read the arena), then free the ring's device buffers, then unregister the pinned arena. `close()` does it;
an engine dropped without `close()` does it too, from a finalizer that holds the ring (so the buffers
cannot be freed before it has waited).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import weakref
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from subspec_core.copies import CopyEngine, WhileWaiting, make_copies
from subspec_core.model import DenseLinears, Linears
from subspec_core.weights import LayerFiller, LayerLayout

log = logging.getLogger(__name__)


class HostLayerStore:
    """Streamed layers' flat weights in one host arena (pinned with cudaHostRegister on CUDA: exact size).

    PyTorch's pinned allocator rounds every allocation up to a power of two (host RAM can nearly double),
    so we allocate ordinary memory once and register it with the driver instead. The arena's pages are
    touched only as layers are written into it; `pin` registers it once it is full (page-locking commits
    every page, and the driver reads registered memory as it is).
    """

    def __init__(self, *, layout: LayerLayout, layer_ids: Sequence[int], dtype: torch.dtype, pin: bool = False) -> None:
        self.layout = layout
        self.layer_ids = tuple(layer_ids)
        self.arena = torch.empty(len(self.layer_ids) * layout.numel, dtype=dtype)
        self.pinned = False
        self._index = {layer: k for k, layer in enumerate(self.layer_ids)}
        if pin:
            self.pin()

    def pin(self) -> None:
        """Page-lock the arena (idempotent; falls back to pageable memory with a warning)."""
        if not self.pinned and self.arena.numel() > 0:
            self.pinned = _register_pinned(self.arena)

    def layer(self, layer_id: int) -> torch.Tensor:
        """The flat host buffer of one streamed layer."""
        k = self._index[layer_id]
        return self.arena[k * self.layout.numel : (k + 1) * self.layout.numel]

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.arena.data_ptr())
            self.pinned = False


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def trim_host_heap() -> None:
    """Hand freed heap memory back to the OS. Quantizing a layer on the CPU frees tens of MB of temporaries that
    glibc keeps in its per-thread arenas rather than reuse, so without this the resident set grows by that much
    per layer while loading."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _register_pinned(arena: torch.Tensor) -> bool:
    """Page-lock an existing host tensor in place; falls back to pageable memory with a warning."""
    nbytes = arena.numel() * arena.element_size()
    result = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), nbytes, 0)
    ok = int(getattr(result, "value", result)) == 0
    if not ok:
        log.warning("cudaHostRegister of %.2f GiB failed (%s): streaming from pageable memory (slower)", nbytes / 2**30, result)
    return ok


def release_ring(*, copies: Any, buffers: list[list[Any]], store: HostLayerStore) -> None:
    """Tear a streaming ring down in order: wait for in-flight copies (and stop a simulated link's thread),
    free the device buffers, unregister the arena. `buffers` are the lists holding the slots and their views,
    emptied."""
    copies.close()
    for held in buffers:
        held.clear()
    store.close()


class LayerStreamer:
    """Cycles the streamed layers through `num_slots` device buffers on a dedicated copy stream."""

    def __init__(self, *, store: HostLayerStore, device: torch.device, num_slots: int,
                 copies: CopyEngine | None = None) -> None:
        if num_slots < 2:
            raise ValueError("the streaming ring needs at least two slots")
        self.store = store
        self.order = store.layer_ids  # the cyclic consumption order
        self.device = device
        self.num_slots = num_slots
        self.slots = [torch.empty(store.layout.numel, dtype=store.arena.dtype, device=device) for _ in range(num_slots)]
        self.slot_views = [store.layout.views(slot) for slot in self.slots]
        self.on_cuda = device.type == "cuda"
        self.copies = copies if copies is not None else make_copies(device=device, num_slots=num_slots)
        self.h2d_bytes = 0  # total weight bytes copied host-to-device since construction
        self._slot_nbytes = store.layout.numel * store.arena.element_size()
        self._issued = 0  # copies issued (sequence number of the next copy)
        self._consumed = 0  # layers released (sequence number of the next layer to use)
        self._prime()
        # never references self: it runs when the streamer is collected, or once from close()
        self._teardown = weakref.finalize(self, release_ring, copies=self.copies,
                                          buffers=[self.slots, self.slot_views], store=store)

    def _prime(self) -> None:
        while self.order and self._issued - self._consumed < self.num_slots:
            self._issue_copy()

    def _issue_copy(self) -> None:
        seq = self._issued
        slot = seq % self.num_slots
        host = self.store.layer(self.order[seq % len(self.order)])
        self.copies.copy(seq=seq, slot=slot, dest=self.slots[slot], source=host)  # after slot's release of seq - S
        self.h2d_bytes += self._slot_nbytes
        self._issued += 1

    def acquire(self, layer_id: int, while_waiting: WhileWaiting | None = None) -> dict[str, torch.Tensor]:
        """Weight views of `layer_id` in its slot, ordered after its copy on the current stream (a simulated
        link runs `while_waiting` while the copy is still in flight)."""
        seq = self._consumed
        expected = self.order[seq % len(self.order)]
        if layer_id != expected:
            raise RuntimeError(f"layers must be streamed in order: asked for {layer_id}, next is {expected}")
        slot = seq % self.num_slots
        self.copies.wait_filled(seq=seq, slot=slot, while_waiting=while_waiting)
        return self.slot_views[slot]

    def release(self, layer_id: int) -> None:
        """The current stream is done with `layer_id`'s slot: refill it with the next layer in the cycle."""
        seq = self._consumed
        self.copies.mark_free(seq=seq, slot=seq % self.num_slots)
        self._consumed += 1
        self._prime()

    def close(self) -> None:
        """Wait for in-flight prefetches, free the ring, unregister the pinned host arena (idempotent)."""
        self._teardown()

    def reset(self) -> None:
        """Recover the cycle after a forward was interrupted part-way (an exception inside a layer): wait for
        every issued copy (each one's slot was released before it was issued), then count from 0 again."""
        self.copies.drain()
        self.copies.restart()
        self._issued = self._consumed = 0
        self._prime()


class TargetLayers:
    """The target's layer source: resident full-precision layers, the rest streamed through the ring."""

    def __init__(self, *, resident: dict[int, dict[str, torch.Tensor]], streamer: LayerStreamer | None) -> None:
        self.resident = {i: DenseLinears(w) for i, w in resident.items()}
        self.streamer = streamer

    def acquire(self, layer: int, while_waiting: WhileWaiting | None = None) -> Linears:
        linears = self.resident.get(layer)
        if linears is not None:
            return linears
        assert self.streamer is not None, f"layer {layer} is neither resident nor streamed"
        return DenseLinears(self.streamer.acquire(layer, while_waiting))

    def release(self, layer: int) -> None:
        if layer not in self.resident and self.streamer is not None:
            self.streamer.release(layer)

    @property
    def h2d_bytes(self) -> int:
        return 0 if self.streamer is None else self.streamer.h2d_bytes

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()


class OverlappedLayers:
    """The target's layers for one forward whose streamed-layer waits run `while_waiting` (post-speculation's
    pending draft levels, postspec.py) while a copy is still in flight, where the copy engine blocks the host."""

    def __init__(self, layers: TargetLayers, while_waiting: WhileWaiting) -> None:
        self._layers = layers
        self._while_waiting = while_waiting

    def acquire(self, layer: int) -> Linears:
        return self._layers.acquire(layer, self._while_waiting)

    def release(self, layer: int) -> None:
        self._layers.release(layer)


def place_layers(
    *,
    fill_layer: LayerFiller,
    num_layers: int,
    layout: LayerLayout,
    dtype: torch.dtype,
    resident_ids: Sequence[int],
    device: torch.device,
    num_slots: int,
    on_streamed: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    progress: bool = True,
    copies: Callable[[], CopyEngine] | None = None,
) -> TargetLayers:
    """Write every layer once, in order, where it lives: resident layers into device buffers, streamed ones
    into their slot of the host arena. `on_streamed(i, views)` sees each streamed layer as soon as it is in
    the arena (the draft quantizes it from there), so no layer is ever held twice on the host. On CUDA the
    arena is page-locked once it is full."""
    resident_set = set(resident_ids)
    streamed_ids = [i for i in range(num_layers) if i not in resident_set]
    store = HostLayerStore(layout=layout, layer_ids=streamed_ids, dtype=dtype) if streamed_ids else None
    resident: dict[int, dict[str, torch.Tensor]] = {}
    for i in tqdm(range(num_layers), desc="loading layers", unit="layer", disable=not progress):
        if i in resident_set:
            views = layout.views(torch.empty(layout.numel, dtype=dtype, device=device))
            fill_layer(i, views)
            resident[i] = views
        else:
            assert store is not None
            views = layout.views(store.layer(i))
            fill_layer(i, views)
            if on_streamed is not None:
                on_streamed(i, views)
        trim_host_heap()
    if store is not None and device.type == "cuda":
        store.pin()
    streamer = (LayerStreamer(store=store, device=device, num_slots=num_slots,
                              copies=None if copies is None else copies()) if store is not None else None)
    return TargetLayers(resident=resident, streamer=streamer)
