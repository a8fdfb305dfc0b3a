"""The batched draft level (batch_drafting.grow_batched) replayed as CUDA graphs, one per composition.

A level's work is fixed by its composition: the ordered (drafter, KV region, bucket length L) of the sequences
growing at it, and whether it is the root level. Every tensor the level reads or writes is a persistent buffer of
those drafters and regions (`TreeDrafter.root_inputs`/`level_inputs` return the drafter's own root, N, frontier,
slots and bucket mask views; the root and N are copied in by `start_tree`, outside the level), the row counts
and L are host ints of the composition, and no op reads a device value on the host. So a graph captured for a
composition replays right whenever it recurs, whatever the tokens and N: it recurs level after level within a
grow and iteration after iteration, and changes only when a sequence joins or leaves, crosses a bucket boundary,
or stops growing before the others (its tree is shallower).

Why per composition rather than per batch-size bucket (the issue's wording): padding to a bucket of B rows would
need every sequence's rows in one shared set of buffers and one mask over all regions, a rewrite of the
per-region attention; the composition is already static, and a batch's make-up changes rarely.

Captured lazily, on a composition's first use: the set is too large to capture at build, and a capture
synchronises the device, which only a new composition pays. That first use runs the level eagerly on a side
stream (the warm-up torch asks for, and this level's result: capture only records, it executes nothing), then
records it. All graphs share one memory pool. Invariant: a level leaves no tensor in the pool, each result is
copied into persistent drafter buffers before the level ends, and replays run in turn on one stream, so each
graph may use the whole pool as scratch. At most `max_graphs` are kept (least recently used dropped; the pool
keeps its blocks for the next). If a capture fails, a warning says so once and new compositions run eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Callable, Hashable, Iterator, Protocol
from unittest import mock

import torch

log = logging.getLogger(__name__)

# Compositions kept: a batch of B sequences over a few buckets meets far fewer in practice.
MAX_GRAPHS = 64

LevelStep = Callable[[], None]  # one level: the draft forward over every growing sequence and their updates


@contextlib.contextmanager
def keeping_cached_blocks() -> Iterator[None]:
    """Within it, `torch.cuda.empty_cache` does nothing. Entering `torch.cuda.graph` empties the allocator's cache
    to give a capture room; a capture made mid-serving (a new composition) would then hand back the blocks the
    verify forward is about to take again, and every cudaMalloc of theirs synchronises the device, stalling the
    weight stream. The plan's budget already holds those blocks, so they stay. (vLLM patches its graph captures
    the same way.)"""
    with mock.patch.object(torch.cuda, "empty_cache", lambda: None):
        yield


class Replayable(Protocol):
    def replay(self) -> None: ...


class BatchGraphs:
    """Captured batched draft levels by composition (see the module docstring); `run` replays or captures."""

    def __init__(self, *, device: torch.device, max_graphs: int = MAX_GRAPHS) -> None:
        self.device = device
        self.max_graphs = max_graphs
        self.capturing = True  # False after a failed capture: new compositions run eagerly
        self.captures = 0
        self.replays = 0
        self._graphs: OrderedDict[Hashable, Replayable] = OrderedDict()
        self._pool: tuple[int, int] | None = None  # made at the first capture
        self._side: torch.cuda.Stream | None = None  # one warm-up stream: its cached blocks serve every warm-up

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, composition: Hashable, step: LevelStep) -> None:
        """Run one level: replay its composition's graph, or run `step` and capture it (the step must read and
        write only persistent buffers named by `composition`)."""
        graph = self._graphs.get(composition)
        if graph is not None:
            self._graphs.move_to_end(composition)
            graph.replay()
            self.replays += 1
            return
        if not self.capturing:
            step()
            return
        self._warm_up(step)  # the level is done; what follows only records it
        try:
            graph = self._record(step)
        except Exception as exc:  # noqa: BLE001 - the eager path is correct, only slower
            log.warning("capturing a batched draft level as a CUDA graph failed (%s: %s); new batch compositions "
                        "draft eagerly", type(exc).__name__, exc)
            self.capturing = False
            return
        self.captures += 1
        self._graphs[composition] = graph
        if len(self._graphs) > self.max_graphs:  # not in flight: the capture synchronised the device
            self._graphs.popitem(last=False)

    def _warm_up(self, step: LevelStep) -> None:
        """Run the level on the side stream, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        self._side.wait_stream(current)
        try:
            with torch.cuda.stream(self._side):
                step()
        finally:  # even when it fails: what follows must not overtake side-stream kernels writing draft rows
            current.wait_stream(self._side)

    def _record(self, step: LevelStep) -> Replayable:
        """Capture `step` into the shared pool; nothing runs. A failed capture leaves the stream it was made on
        current (torch.cuda.graph ends the capture before it restores the stream, and an error in between skips the
        restore), so the caller's stream is restored here and the device drained before eager drafting resumes."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with keeping_cached_blocks(), torch.cuda.graph(graph, pool=self._pool):
                step()
        except BaseException:
            torch.cuda.set_stream(current)
            torch.cuda.synchronize(self.device)
            raise
        return graph
