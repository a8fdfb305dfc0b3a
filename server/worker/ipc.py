"""Typed messages between the API process and the engine worker (process or thread).

Everything here is a plain, picklable dataclass: a `multiprocessing` pipe carries them unchanged. The API
sends `Submit`, `Abort` and `Shutdown`; the worker answers with `Ready` once (after loading the engine) or
`Fatal` (it could not load), then per request any number of `Event`s and `Heartbeat`s, at most one `Error`,
and one `Done`; a worker that decodes several requests together also sends a `Step` per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

from subspec_core.types import GenerationRequest, TokenEvent


@dataclass(frozen=True)
class Submit:
    """Queue one generation on the worker; it runs after the ones submitted before it."""

    request: GenerationRequest


@dataclass(frozen=True)
class Abort:
    """Stop a request within one draft level or target layer (or drop it if it has not started)."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Stop the current request and exit the worker loop."""


@dataclass(frozen=True)
class Ready:
    """The engine is loaded; sent once per worker."""

    model_name: str
    max_model_len: int
    pid: int
    max_num_seqs: int = 1  # requests the worker runs at once (its loop's slots; the planner's count when auto)


@dataclass(frozen=True)
class Fatal:
    """The worker could not start (e.g. the model failed to load); it exits after sending this."""

    message: str


@dataclass(frozen=True)
class Event:
    """One engine iteration's output for a request."""

    event: TokenEvent


@dataclass(frozen=True)
class Heartbeat:
    """The engine is making progress on a request (sent at most about once a second while it works)."""

    request_id: str


@dataclass(frozen=True)
class Step:
    """A batched iteration ended: its target forward served `sequences` requests with `rows` rows (their trees
    and prompt chunks); max_num_seqs > 1 only."""

    sequences: int
    rows: int


@dataclass(frozen=True)
class Error:
    """A request failed on the worker; status_code and error_type are what the HTTP client sees."""

    request_id: str
    status_code: int
    error_type: str
    message: str


@dataclass(frozen=True)
class Done:
    """The worker has let go of a request (finished, aborted or failed): the GPU is free for the next."""

    request_id: str


ToWorker = Submit | Abort | Shutdown
FromWorker = Ready | Fatal | Event | Heartbeat | Step | Error | Done
