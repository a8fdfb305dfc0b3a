"""What chat and text completions share: checks, sampling parameters, admission, and running one request.

`GenerationService.events(job, ticket, record)` is the one path from an admitted request to the engine:
wait for the GPU slot, wait for a ready worker, submit, yield `TokenEvent`s, all within the request's
deadline. However it ends (finished, deadline, worker death, client gone, server shutting down), it aborts
the engine request if unfinished, releases the slot and records the outcome, so no exit path can leak the GPU.
Prompt preparation (chat template, tokenization) runs on a worker thread, so a large request never stalls
the event loop that serves /health and the other streams.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request

from server.admission import Admission, AdmissionClosed, QueueFull, Ticket
from server.engine_client import EngineClient, EngineError, ModelInfo
from server.errors import APIError, bad_request
from server.request_id import log_suffix
from server.schemas import SamplingFields
from server.settings import ServerSettings
from server.telemetry import STATUS_CLIENT_CLOSED, RequestRecord, ServerMetrics
from subspec_core.types import GenerationRequest, RequestStats, SamplingParams, TokenEvent

logger = logging.getLogger(__name__)

T = TypeVar("T")

_HEADER_NAMES = 32  # unknown field names listed in X-SubSpec-Ignored-Fields
_LOGGED_NAMES = 1024  # distinct unknown field names logged per server


@dataclass(frozen=True)
class Job:
    """A validated request, ready to queue."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    deadline: float | None  # event-loop time; None: no deadline
    correlation_id: str | None = None  # the HTTP request's X-Request-Id, quoted in log lines


@dataclass(frozen=True)
class Completion:
    """A non-streamed result: its events in order, and what they add up to."""

    text: str
    finish_reason: str
    completion_tokens: int
    events: tuple[TokenEvent, ...] = ()
    stats: RequestStats | None = None


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) response was ready."""


def shutting_down(message: str = "the server is shutting down; retry shortly (on another instance)") -> APIError:
    """The 503 of a request turned away or ended by a graceful shutdown."""
    return APIError(503, message, type="server_error", code="shutting_down", headers={"Retry-After": "5"})


class GenerationService:
    """Shared request handling for /v1/chat/completions and /v1/completions."""

    def __init__(self, *, client: EngineClient, admission: Admission, metrics: ServerMetrics,
                 settings: ServerSettings, model_name: str) -> None:
        self.client = client
        self.admission = admission
        self.metrics = metrics
        self.settings = settings
        self.model_name = model_name
        # One thread: templating and tokenizing are serialised (a tokenizer is not safe to share between
        # threads), but they no longer block the event loop. HF tokenizers release the GIL while encoding.
        self._prompt_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="subspec-prompt")
        self._stopping: asyncio.Future[str] | None = None  # resolves (to a message) when the server stops
        self._ignored_logged: set[str] = set()  # unknown request fields already logged (once per name)

    async def prepare(self, build: Callable[..., T], *args: Any) -> T:
        """Run a prompt builder on the prompt thread (its APIErrors propagate unchanged)."""
        return await asyncio.get_running_loop().run_in_executor(self._prompt_thread, build, *args)

    def close(self) -> None:
        """Let the prompt thread go (at app shutdown)."""
        self._prompt_thread.shutdown(wait=False, cancel_futures=True)

    def stop(self, message: str) -> None:
        """End every request still being served with a 503 `message` (the last step of a graceful shutdown):
        a stream gets a final error event and [DONE], a non-streamed request its error response."""
        stopping = self._stop_signal()
        if not stopping.done():
            stopping.set_result(message)

    def _stop_signal(self) -> asyncio.Future[str]:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    # -- checks, in the order a request meets them ------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def note_ignored(self, names: list[str]) -> dict[str, str]:
        """Log each unknown request field the first time it is seen; the response header that lists them.

        Names come from the client: the header shows them escaped to printable ASCII (no header injection,
        nothing Latin-1 cannot encode) and at most `_HEADER_NAMES` of them; at most `_LOGGED_NAMES` distinct
        names are remembered, so a client inventing names cannot grow memory or the log without bound.
        """
        for name in names:
            if name not in self._ignored_logged and len(self._ignored_logged) < _LOGGED_NAMES:
                self._ignored_logged.add(name)
                logger.warning("ignoring unknown request field %r (logged once per field name)", name)
        if not names:
            return {}
        shown = [name.encode("unicode_escape").decode("ascii") for name in names[:_HEADER_NAMES]]
        if len(names) > _HEADER_NAMES:
            shown.append(f"... ({len(names) - _HEADER_NAMES} more)")
        return {"X-SubSpec-Ignored-Fields": ", ".join(shown)}

    @staticmethod
    def check_supported(names: list[str]) -> None:
        if names:
            raise bad_request(f"Unsupported parameter(s) for this server: {', '.join(names)}. Leave them "
                              f"unset or at their default values.", param=names[0].split(" ")[0],
                              code="unsupported_parameter")

    def check_ready(self) -> ModelInfo:
        if self.admission.closed:
            raise shutting_down()
        info = self.client.model_info
        if not self.client.is_ready() or info is None:
            state = self.client.status().get("state", "loading")
            raise APIError(503, f"the engine worker is not ready ({state}); retry shortly", type="server_error",
                           code="engine_not_ready", headers={"Retry-After": "5"})
        return info

    @staticmethod
    def sampling_params(request: SamplingFields, *, prompt_len: int, max_model_len: int, max_tokens: int | None,
                        max_tokens_param: str, prompt_param: str, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, min_tokens: int = 1) -> SamplingParams:
        """OpenAI fields -> SamplingParams, checking the context window. max_tokens None: fill it; it may be 0
        only where `min_tokens` is 0 (an echo that just scores the prompt)."""
        remaining = max_model_len - prompt_len
        if remaining < 1:
            raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, your "
                              f"prompt has {prompt_len} tokens, which leaves no room for a completion. Please "
                              f"shorten the prompt.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = remaining
        elif max_tokens < min_tokens:
            raise bad_request(f"{max_tokens_param} must be at least {min_tokens}, got {max_tokens}"
                              + (" (0 is allowed with echo)" if max_tokens == 0 else ""), param=max_tokens_param,
                              code="invalid_value")
        elif max_tokens > remaining:
            raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you "
                              f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                              f"{max_tokens} for the completion). Please reduce the prompt or "
                              f"{max_tokens_param}.", param=max_tokens_param, code="context_length_exceeded")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=0 if request.top_k in (None, -1) else request.top_k,
                # Without a seed, each sampled request draws a fresh one (as OpenAI, vLLM and llama.cpp do);
                # the engine's fixed default seed would make every "random" reply to a prompt the same.
                seed=secrets.randbits(63) if request.seed is None else request.seed,
                stop=request.stop_strings(),
                ignore_eos=request.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    def job(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
            record: RequestRecord, correlation_id: str | None = None) -> Job:
        timeout = self.settings.request_timeout_s
        # The deadline runs from arrival: time spent validating and queueing counts.
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout - (
            time.monotonic() - record.arrival)
        return Job(request_id, tuple(prompt_ids), sampling, deadline, correlation_id)

    def admit(self, request_id: str) -> Ticket:
        try:
            return self.admission.reserve(request_id)
        except AdmissionClosed:
            raise shutting_down() from None
        except QueueFull as exc:
            raise APIError(429, f"The server is busy: {exc}. Retry later.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from exc

    # -- running ----------------------------------------------------------------------------------------
    async def _bounded(self, awaitable: Awaitable[T], job: Job, doing: str) -> T:
        """`awaitable`'s result, unless the request's deadline passes (504) or the server stops (503) first."""
        stopping = self._stop_signal()
        if stopping.done():
            raise shutting_down(stopping.result())
        work = asyncio.ensure_future(awaitable)
        timeout = None if job.deadline is None else max(0.0, job.deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait({work, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
        if not work.cancelled() and work.done():
            return work.result()
        if stopping.done():
            raise shutting_down(stopping.result())
        timeout_s = self.settings.request_timeout_s
        raise APIError(504, f"the request exceeded the server's request timeout of {timeout_s:g} s while "
                            f"{doing}; it was stopped", type="timeout_error", code="request_timeout")

    async def events(self, job: Job, ticket: Ticket, record: RequestRecord) -> AsyncIterator[TokenEvent]:
        """Run one admitted request; yields its TokenEvents. Raises APIError when it fails."""
        status = STATUS_CLIENT_CLOSED  # unless it finishes or fails below, the consumer went away
        stream = None
        try:
            await self._bounded(ticket.wait_turn(), job, "waiting in the queue")
            await self._bounded(self.client.wait_ready(), job, "waiting for the engine worker")
            record.on_start(len(job.prompt_ids))
            stream = self.client.submit(GenerationRequest(job.request_id, job.prompt_ids, job.sampling,
                                                          correlation_id=job.correlation_id))
            while True:
                try:
                    event = await self._bounded(anext(stream), job, "generating")
                except StopAsyncIteration:  # someone else aborted it through the engine client
                    raise APIError(500, "the request was aborted before it finished", type="server_error",
                                   code="aborted") from None
                record.on_event(event)
                if event.finished:
                    status = 200
                yield event
                if event.finished:
                    return
        except AdmissionClosed:
            status = 503
            raise shutting_down() from None
        except APIError as exc:
            status = exc.status_code
            raise
        except EngineError as exc:
            status = exc.status_code
            raise APIError(exc.status_code, exc.message, type=exc.error_type, code=exc.code) from exc
        finally:
            if stream is not None:
                stream.close()  # aborts the engine request if it has not finished
            ticket.release()
            record.finish(status)
            logger.info("%s: status %d, %d prompt + %d generated tokens, first token %s, total %.2f s%s",
                        job.request_id, status, len(job.prompt_ids), record.tokens,
                        "-" if record.first_token is None else f"{record.first_token - record.arrival:.2f} s",
                        time.monotonic() - record.arrival, log_suffix(job.correlation_id))

    async def collect(self, job: Job, ticket: Ticket, record: RequestRecord, raw_request: Request) -> Completion:
        """Run a non-streamed request to the end; abort it if the client disconnects meanwhile."""
        consume = asyncio.ensure_future(self._collect(job, ticket, record))
        watch = asyncio.ensure_future(_client_gone(raw_request))
        try:
            await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not consume.done():
                consume.cancel()  # the cancellation runs events()' cleanup: abort, release, record 499
                await asyncio.gather(consume, return_exceptions=True)
        if consume.cancelled():
            raise ClientGone()
        return consume.result()

    async def _collect(self, job: Job, ticket: Ticket, record: RequestRecord) -> Completion:
        collected: list[TokenEvent] = []
        tokens = 0
        finish_reason = "stop"
        stats = None
        async with aclosing(self.events(job, ticket, record)) as events:
            async for event in events:
                collected.append(event)
                tokens += len(event.token_ids)
                if event.finished:
                    finish_reason = event.finish_reason or "stop"
                    stats = event.stats
                    if event.stats is not None and event.stats.completion_tokens:
                        tokens = event.stats.completion_tokens
        return Completion("".join(e.text for e in collected), finish_reason, tokens, tuple(collected), stats)


async def _client_gone(raw_request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is that)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


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
