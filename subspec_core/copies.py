"""The copy engine under the streaming ring: how a layer gets into its ring slot, and how compute is ordered
against it. One interface, `CopyEngine`, and three implementations:

- `CudaCopies`: a dedicated copy stream; `filled[s]` recorded after the copy into slot s, `free[s]` recorded by
  the compute stream after the slot's last reader. No host synchronisation.
- `SimulatedLink` (CPU, a development and benchmarking aid): a copy thread that moves each layer at a set
  bandwidth, with the two events as per-slot sequence counters under one Condition, and optional seeded random
  delays per copy and per compute step, so that a missing wait shows up as wrong tokens.
- `InlineCopies` (CPU without a simulated link): the degenerate form, a synchronous copy; every wait is free.

Ordering, by sequence number k (the k-th copy the ring issues, into slot k % S):

    copy k        waits until slot k % S has been released by its previous occupant, sequence k - S
    acquire k     waits until copy k has landed in slot k % S
    release k     publishes that slot k % S may be overwritten (by copy k + S)

A waiting acquire may run `while_waiting()` (post-speculation's pending draft levels, postspec.py) instead of
sleeping: the simulated link calls it while the slot is not yet filled; CUDA never blocks the host, so it
ignores it (its draft work goes on a side stream instead).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from typing import Callable, Protocol

import torch

WhileWaiting = Callable[[], bool]  # runs one unit of pending work; False when none is left


class CopyEngine(Protocol):
    """Moves streamed layers into ring slots and orders compute against those copies (see the module docstring)."""

    def copy(self, *, seq: int, slot: int, dest: torch.Tensor, source: torch.Tensor) -> None: ...
    def wait_filled(self, *, seq: int, slot: int, while_waiting: WhileWaiting | None = None) -> None: ...
    def mark_free(self, *, seq: int, slot: int) -> None: ...
    def drain(self) -> None: ...
    def restart(self) -> None: ...
    def close(self) -> None: ...


class InlineCopies:
    """CPU without a simulated link: the copy happens when issued, so every wait is already satisfied."""

    def copy(self, *, seq: int, slot: int, dest: torch.Tensor, source: torch.Tensor) -> None:
        dest.copy_(source)

    def wait_filled(self, *, seq: int, slot: int, while_waiting: WhileWaiting | None = None) -> None:
        pass

    def mark_free(self, *, seq: int, slot: int) -> None:
        pass

    def drain(self) -> None:
        pass

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass


class CudaCopies:
    """A copy stream with per-slot filled/free events. A wait on an event never recorded is a no-op, which is
    what the first S copies (slots never used) and the first acquire after `restart` need."""

    def __init__(self, *, device: torch.device, num_slots: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # the ring's slots were allocated on the compute stream, whose last kernels (quantizing the draft) may
        # still read memory the allocator handed them: the first copies wait for that work
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.filled = [torch.cuda.Event() for _ in range(num_slots)]
        self.free = [torch.cuda.Event() for _ in range(num_slots)]

    def copy(self, *, seq: int, slot: int, dest: torch.Tensor, source: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[slot])  # compute has finished reading this slot
            dest.copy_(source, non_blocking=True)
            self.filled[slot].record(self.stream)

    def wait_filled(self, *, seq: int, slot: int, while_waiting: WhileWaiting | None = None) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.filled[slot])

    def mark_free(self, *, seq: int, slot: int) -> None:
        self.free[slot].record(torch.cuda.current_stream(self.device))

    def drain(self) -> None:
        torch.cuda.synchronize(self.device)  # the copy stream, and compute still reading a slot

    def restart(self) -> None:
        pass  # after drain every event has completed: waiting on them again is free

    def close(self) -> None:
        self.stream.synchronize()


class SimulatedLink:
    """A host-to-device link imitated on the CPU: a copy thread moves each layer at `gbps` (10^9 bytes/s).

    A copy takes nbytes / bandwidth from when the link and its slot are both free; the bytes land at the END
    of that time (the thread sleeps, then copies), so a reader that skips `wait_filled` reads the slot's
    previous layer. `jitter_s` adds a uniform random delay in [0, jitter_s) before each copy (copy thread) and
    after each wait (compute thread, as a slow layer), from two generators seeded with `seed`.
    """

    def __init__(self, *, num_slots: int, gbps: float, jitter_s: float = 0.0, seed: int = 0) -> None:
        if gbps <= 0:
            raise ValueError("the simulated link's bandwidth must be > 0")
        self.num_slots = num_slots
        self.bytes_per_s = gbps * 1e9
        self.jitter_s = jitter_s
        self._copy_rng, self._compute_rng = random.Random(seed), random.Random(seed + 1)
        self._cond = threading.Condition()
        self._filled = [-1] * num_slots  # the sequence number whose copy last landed in each slot
        self._freed = [-1] * num_slots  # the sequence number last released from each slot
        self._pending: collections.deque[tuple[int, int, torch.Tensor, torch.Tensor]] = collections.deque()
        self._busy = False  # a copy is in flight (taken off `_pending`, not landed yet)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="simulated-link", daemon=True)
        self._thread.start()

    def copy(self, *, seq: int, slot: int, dest: torch.Tensor, source: torch.Tensor) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the simulated link is closed")
            self._pending.append((seq, slot, dest, source))
            self._cond.notify_all()

    def wait_filled(self, *, seq: int, slot: int, while_waiting: WhileWaiting | None = None) -> None:
        with self._cond:
            while self._filled[slot] < seq:
                if while_waiting is not None:
                    self._cond.release()  # the pending work runs while the copy thread fills the slot
                    try:
                        more = while_waiting()
                    finally:
                        self._cond.acquire()
                    if not more:
                        while_waiting = None
                    continue
                self._cond.wait()
        if self.jitter_s:
            time.sleep(self._compute_rng.uniform(0.0, self.jitter_s))

    def mark_free(self, *, seq: int, slot: int) -> None:
        with self._cond:
            self._freed[slot] = seq
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every issued copy has landed."""
        with self._cond:
            while (self._pending or self._busy) and not self._closed:
                self._cond.wait()

    def restart(self) -> None:
        """Sequence numbers start again from 0 (after `drain`: no copy is in flight)."""
        with self._cond:
            assert not self._pending and not self._busy, "restart the link only once it is drained"
            self._filled = [-1] * self.num_slots
            self._freed = [-1] * self.num_slots

    def close(self) -> None:
        """Let the copy in flight land, drop the rest, stop the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        link_free_at = time.perf_counter()
        while True:
            with self._cond:
                # the next copy, once its slot's previous occupant (sequence seq - S) is released
                while not self._closed and not (self._pending and self._freed[self._pending[0][1]]
                                                 >= self._pending[0][0] - self.num_slots):
                    self._cond.wait()
                if self._closed:
                    return
                seq, slot, dest, source = self._pending.popleft()
                self._busy = True
            if self.jitter_s:
                time.sleep(self._copy_rng.uniform(0.0, self.jitter_s))
            start = max(time.perf_counter(), link_free_at)
            link_free_at = start + dest.numel() * dest.element_size() / self.bytes_per_s
            time.sleep(max(0.0, link_free_at - time.perf_counter()))
            with torch.inference_mode():  # thread-local: the slots may be inference tensors
                dest.copy_(source)
            with self._cond:
                self._filled[slot] = seq
                self._busy = False
                self._cond.notify_all()


def make_copies(*, device: torch.device, num_slots: int, simulate_link_gbps: float | None = None,
                simulate_link_jitter_s: float = 0.0, seed: int = 0) -> CopyEngine:
    """The copy engine for `device`: CUDA's streams and events, a simulated link when asked (CPU only), else
    synchronous copies."""
    if simulate_link_gbps is not None:
        if device.type != "cpu":
            raise ValueError("simulate_link_gbps imitates a link on the CPU; on a GPU the real link is used")
        return SimulatedLink(num_slots=num_slots, gbps=simulate_link_gbps, jitter_s=simulate_link_jitter_s, seed=seed)
    if device.type == "cuda":
        return CudaCopies(device=device, num_slots=num_slots)
    return InlineCopies()
