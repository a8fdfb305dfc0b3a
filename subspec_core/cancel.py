"""Stopping a generation part-way through an engine step.

`Engine.generate` asks the caller's `cancelled`, a cheap `() -> bool`, between draft levels and before every
decoder layer of a target forward, so an abort lands within one level or one layer, not after a whole step
(seconds when layers stream). A true answer raises `GenerationCancelled`, which `generate` turns into a return.
"""

from __future__ import annotations

from typing import Callable

from subspec_core.model import Linears, LayerSource

CancelCheck = Callable[[], bool]


class GenerationCancelled(Exception):
    """The caller's cancel check turned true inside an engine step (never escapes `Engine.generate`)."""


def raise_if_cancelled(cancelled: CancelCheck | None) -> None:
    """Raise `GenerationCancelled` when the caller asked to stop."""
    if cancelled is not None and cancelled():
        raise GenerationCancelled()


class CancellableLayers:
    """A LayerSource that checks `cancelled` before handing out each layer (wraps the target's layers)."""

    def __init__(self, layers: LayerSource, cancelled: CancelCheck) -> None:
        self._layers = layers
        self._cancelled = cancelled

    def acquire(self, layer: int) -> Linears:
        raise_if_cancelled(self._cancelled)
        return self._layers.acquire(layer)

    def release(self, layer: int) -> None:
        self._layers.release(layer)
