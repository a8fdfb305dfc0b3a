"""Time the compute stream spends waiting for streamed weights, measured from outside the engine.

`LayerStreamer.acquire` makes the compute stream wait on the layer's "copy finished" event. Two CUDA events
recorded on the compute stream, one just before that wait and one just after, bracket exactly the stall:
the first completes when the previous layer's kernels are done, the second when the copy is done too, so
their distance is how long compute sat idle for the copy (about 0 when the copy was already there).

The engine has no hook for this, so the probe wraps the streamer object's `acquire` (an instance attribute
shadowing the method; `close` removes it). It only exists on CUDA: on the CPU the copies are synchronous
memcpys inside `release`, there is no wait to measure, and the column is n/a.
"""

from __future__ import annotations

from typing import Any

import torch

from subspec_core.stopwatch import Stopwatch


class CopyWaitProbe:
    """Events around every streamed-layer wait; `seconds_since(mark)` sums the stalls recorded after `mark`."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer
        self._watch = Stopwatch(streamer.device)
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._acquire = streamer.acquire
        streamer.acquire = self._timed_acquire

    @classmethod
    def attach(cls, engine: Any) -> "CopyWaitProbe | None":
        """A probe on the engine's streamer, or None when nothing is streamed or the engine is not on CUDA."""
        streamer = engine.target_layers.streamer
        return cls(streamer) if streamer is not None and streamer.on_cuda else None

    def _timed_acquire(self, layer_id: int, while_waiting: Any = None) -> dict[str, torch.Tensor]:
        before = self._watch.mark()
        views = self._acquire(layer_id, while_waiting)  # the compute stream waits on filled[slot]
        self._pairs.append((before, self._watch.mark()))
        return views

    def mark(self) -> int:
        """A position in the record; waits after it are summed by `seconds_since`."""
        return len(self._pairs)

    def seconds_since(self, mark: int) -> float:
        """Total stall of the waits recorded after `mark` (synchronises on the last event)."""
        pairs = self._pairs[mark:]
        if not pairs:
            return 0.0
        self._watch.wait(pairs[-1][1])
        return sum(self._watch.seconds(before, after) for before, after in pairs)

    def clear(self) -> None:
        self._pairs.clear()

    def close(self) -> None:
        """Restore the streamer's own `acquire`."""
        self.streamer.__dict__.pop("acquire", None)
        self._pairs.clear()
