"""The reply shape chat and text completions share: `choices`, streamed as chunks or folded into one body.

A `ChoiceBuilder` turns a request's token events into streamed deltas; the whole (non-streamed) choice is the
fold of the same deltas, so streamed and non-streamed responses always agree. The stream is

    [opening chunk], a chunk per event with something to say, the closing chunk(s), [usage chunk], [DONE]

and a failure after the 200 becomes an `{"error": ...}` event followed by `[DONE]`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import aclosing
from typing import Any, AsyncIterator

from server.api.endpoint import Endpoint, EventStream, Prepared
from server.api.errors import APIError
from server.api.sse import DONE_FRAME, sse_frame
from server.worker.runner import Completion, Job
from subspec_core.types import RequestStats, TokenEvent


class ChoiceBuilder(ABC):
    """One request's choice, built from its token events: a streamed delta per event, then the whole."""

    def opening(self) -> dict[str, Any] | None:
        """The choice of a chunk sent before any text (chat: the role), or None."""
        return None

    @abstractmethod
    def on_event(self, event: TokenEvent) -> dict[str, Any] | None:
        """The streamed choice for one event (None: nothing to send yet)."""

    @abstractmethod
    def closing(self, finish_reason: str) -> list[dict[str, Any]]:
        """The last streamed choices (anything held back, then the one with the final finish_reason)."""

    @abstractmethod
    def whole(self) -> dict[str, Any]:
        """The non-streamed choice (after every event and `closing`)."""


def usage(prompt_tokens: int, completion_tokens: int, stats: RequestStats | None = None) -> dict[str, Any]:
    """OpenAI's usage object; with the request's final stats, also the prompt tokens served from the KV cache
    (`prompt_tokens_details.cached_tokens`, as OpenAI and vLLM report them) and `speculative` (what
    speculation did)."""
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if stats is not None:
        body["prompt_tokens_details"] = {"cached_tokens": stats.cached_prompt_tokens}
        body["speculative"] = {"iterations": stats.iterations, "drafted_tokens": stats.drafted_tokens,
                               "accepted_tokens": stats.accepted_tokens,
                               "mean_accept_length": round(stats.mean_accept_length, 4)}
    return body


class ChoicesEndpoint(Endpoint):
    """An endpoint whose reply is OpenAI's `choices` object: chat and text completions."""

    chunk_object: str  # the `object` of streamed chunks
    body_object: str  # the `object` of a whole response

    def body(self, request: Any, job: Job, prepared: Prepared, result: Completion) -> dict[str, Any]:
        builder: ChoiceBuilder = prepared.reply
        for event in result.events:
            builder.on_event(event)
        builder.closing(result.finish_reason)
        return {"id": job.request_id, "object": self.body_object, "created": int(time.time()),
                "model": self.context.model_name, "choices": [builder.whole()],
                "usage": usage(len(job.prompt_ids), result.completion_tokens, result.stats),
                "system_fingerprint": None}

    def stream(self, request: Any, job: Job, prepared: Prepared) -> EventStream:
        return _ChoiceStream(self, job, prepared.reply, include_usage=request.include_usage(),
                             continuous_usage=request.continuous_usage())


class _ChoiceStream(EventStream):
    def __init__(self, endpoint: ChoicesEndpoint, job: Job, builder: ChoiceBuilder, *, include_usage: bool,
                 continuous_usage: bool) -> None:
        self._endpoint = endpoint
        self._job = job
        self._builder = builder
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._created = int(time.time())
        self._tokens = 0

    def _chunk(self, choice: dict[str, Any] | None, usage_value: dict[str, Any] | None = None,
               final_usage: bool = False) -> bytes:
        payload: dict[str, Any] = {"id": self._job.request_id, "object": self._endpoint.chunk_object,
                                   "created": self._created, "model": self._endpoint.context.model_name,
                                   "system_fingerprint": None, "choices": [] if choice is None else [choice]}
        if self._include_usage or self._continuous_usage:
            # with continuous usage every chunk carries the usage so far; otherwise only the final one has it
            if final_usage:
                payload["usage"] = usage_value
            else:
                payload["usage"] = usage(len(self._job.prompt_ids), self._tokens) if self._continuous_usage else None
        return sse_frame(payload)

    async def frames(self) -> AsyncIterator[bytes]:
        job, builder = self._job, self._builder
        opened = False
        try:
            async with aclosing(self._endpoint.context.runner.events(job)) as events:
                async for event in events:
                    if not opened:
                        opened = True
                        opening = builder.opening()
                        if opening is not None:
                            yield self._chunk(opening)
                    self._tokens += len(event.token_ids)
                    choice = builder.on_event(event)
                    if choice is not None:
                        yield self._chunk(choice)
                    if event.finished:
                        if event.stats is not None and event.stats.completion_tokens:
                            self._tokens = event.stats.completion_tokens
                        for choice in builder.closing(event.finish_reason or "stop"):
                            yield self._chunk(choice)
                        if self._include_usage:
                            yield self._chunk(None, usage(len(job.prompt_ids), self._tokens, event.stats),
                                              final_usage=True)
        except APIError as exc:
            for frame in self.failure(exc):
                yield frame
            return
        yield DONE_FRAME

    def failure(self, error: APIError) -> list[bytes]:
        return [sse_frame(error.body(self._job.correlation_id)), DONE_FRAME]
