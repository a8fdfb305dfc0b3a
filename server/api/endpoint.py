"""One request's way through the server: check, prepare, admit, run, reply. Every endpoint takes this path.

`Endpoint.create` is the whole flow, in the order a request meets it:

    valid Unicode (400) -> model (404) -> endpoint rules (400) -> unsupported parameters (400)
    -> worker ready, not shutting down (503) -> prompt and context window (400, on a prompt thread)
    -> queue (429) -> run on the engine (JobRunner) -> reply: one JSON body or an SSE stream

Nothing is queued until every check has passed. Subclasses give only their shapes: `prepare` turns a request
into prompt ids and a per-request reply object, `body` folds a finished run into the JSON response, and
`stream` turns token events into SSE frames (`ChoicesEndpoint` for chat and text completions, the
Responses API in server/api/responses.py).
"""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.api.errors import APIError, bad_request
from server.api.input_limits import IgnoredFields, invalid_text_field
from server.api.logprobs import TokenStrings
from server.api.prompting import PromptBuilder, PromptPool
from server.api.schemas import SamplingFields
from server.api.sse import SSEResponse
from server.edge.request_id import request_id_of
from server.worker.admission import Admission, AdmissionClosed, QueueFull
from server.worker.client import EngineClient, ModelInfo
from server.worker.runner import Completion, Job, JobRunner, deadline_from, shutting_down
from server.worker.telemetry import STATUS_CLIENT_CLOSED, RequestRecord, ServerMetrics
from subspec_core.grammar import Constraint
from subspec_core.types import SamplingParams


@dataclass(frozen=True)
class Prepared:
    """What an endpoint made of a request: prompt ids, decoding limits, and its per-request reply state."""

    prompt_ids: list[int]
    reply: Any  # the endpoint's own: a ChoiceBuilder, or the Responses API's shape
    max_tokens: int | None  # None: fill the context
    max_tokens_param: str
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 1  # 0 where max_tokens 0 makes sense (echo)
    constraint: Constraint | None = None  # a structured output, checked to compile


@dataclass(frozen=True)
class ServingContext:
    """What every endpoint shares: the engine side, the prompt side, and the server's limits."""

    client: EngineClient
    runner: JobRunner
    admission: Admission
    metrics: ServerMetrics
    prompts: PromptBuilder
    prompt_pool: PromptPool
    strings: TokenStrings  # token text and bytes, for logprobs
    ignored: IgnoredFields
    model_name: str
    max_stream_buffer_bytes: int


class Endpoint(ABC):
    """One generation endpoint: the shared request flow, with the endpoint's own prompt and reply shapes."""

    endpoint: str  # metrics label, e.g. "/v1/chat/completions"
    id_prefix: str  # "chatcmpl-" / "cmpl-" / "resp_", as OpenAI spells its ids
    prompt_param: str  # the field that holds the prompt, named in context-length errors

    def __init__(self, context: ServingContext) -> None:
        self.context = context

    # -- what an endpoint adds ------------------------------------------------------------------------
    def check(self, request: Any) -> None:
        """Endpoint rules a request must meet before any work (400); none by default."""

    @abstractmethod
    def prepare(self, request: Any, prompts: PromptBuilder, max_model_len: int) -> Prepared:
        """Endpoint-specific checks (400), the prompt ids and the reply state. Runs on a prompt thread."""

    @abstractmethod
    def body(self, request: Any, job: Job, prepared: Prepared, result: Completion) -> dict[str, Any]:
        """The whole (non-streamed) response body."""

    @abstractmethod
    def stream(self, request: Any, job: Job, prepared: Prepared) -> EventStream:
        """The SSE frames of a streamed response."""

    # -- the flow -------------------------------------------------------------------------------------
    async def create(self, request: Any, raw_request: Request) -> Response:
        """Handle one request; never raises APIError (it becomes the response, and is counted)."""
        context = self.context
        record = context.metrics.start(self.endpoint)
        correlation_id = request_id_of(raw_request)
        headers = context.ignored.note(request.ignored_fields())
        try:
            job, prepared = await self._admit(request, record, correlation_id, _body_size(raw_request))
        except APIError as exc:
            record.finish(exc.status_code)
            return exc.response(correlation_id, extra_headers=headers)
        if request.stream:
            return SSEResponse(self.stream(request, job, prepared), headers=headers, record=job.record,
                               seconds_left=job.seconds_left, max_buffered_bytes=context.max_stream_buffer_bytes)
        try:
            result = await _unless_client_leaves(context.runner.collect(job), raw_request)
        except APIError as exc:  # already counted by the runner
            return exc.response(correlation_id, extra_headers=headers)
        except ClientGone:
            job.record.finish(STATUS_CLIENT_CLOSED)
            return Response(status_code=STATUS_CLIENT_CLOSED)
        job.record.finish(200)
        return JSONResponse(self.body(request, job, prepared, result), headers=headers)

    async def _admit(self, request: Any, record: RequestRecord, correlation_id: str | None,
                     body_size: int) -> tuple[Job, Prepared]:
        context = self.context
        field = invalid_text_field(request)
        if field is not None:
            raise APIError(400, f"'{field}' is not valid Unicode: it contains a lone UTF-16 surrogate (an unpaired "
                                f"\\uD800-\\uDFFF escape)", param=field, code="invalid_unicode")
        if request.model is not None and request.model != context.model_name:
            raise APIError(404, f"The model `{request.model}` does not exist. This server serves "
                                f"`{context.model_name}`.", param="model", code="model_not_found")
        self.check(request)
        unsupported = request.unsupported_parameters()
        if unsupported:
            raise bad_request(f"Unsupported parameter(s) for this server: {', '.join(unsupported)}. Leave them "
                              f"unset or at their default values.", param=unsupported[0].split(" ")[0],
                              code="unsupported_parameter")
        info = self._ready_model()
        prepared = await context.prompt_pool.run(body_size, self.prepare, request, context.prompts, info.max_model_len)
        sampling = sampling_params(
            request, prompt_len=len(prepared.prompt_ids), max_model_len=info.max_model_len,
            max_tokens=prepared.max_tokens, max_tokens_param=prepared.max_tokens_param,
            prompt_param=self.prompt_param, logprobs=prepared.logprobs, prompt_logprobs=prepared.prompt_logprobs,
            min_tokens=prepared.min_tokens, constraint=prepared.constraint)
        request_id = f"{self.id_prefix}{uuid.uuid4().hex}"
        try:
            ticket = context.admission.reserve(request_id)
        except AdmissionClosed:
            raise shutting_down() from None
        except QueueFull as exc:
            raise APIError(429, f"The server is busy: {exc}. Retry later.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from exc
        record.name(request_id, len(prepared.prompt_ids), correlation_id)
        job = Job(request_id, tuple(prepared.prompt_ids), sampling,
                  deadline_from(context.runner.request_timeout_s, record.arrival), ticket, record, correlation_id)
        return job, prepared

    def _ready_model(self) -> ModelInfo:
        """The served model's info; 503 while no worker is ready or the server is shutting down."""
        if self.context.admission.closed:
            raise shutting_down()
        client = self.context.client
        info = client.model_info
        if not client.is_ready() or info is None:
            state = client.status().get("state", "loading")
            raise APIError(503, f"the engine worker is not ready ({state}); retry shortly", type="server_error",
                           code="engine_not_ready", headers={"Retry-After": "5"})
        return info


class EventStream(ABC):
    """The SSE frames of one streamed response, and the frames that end it early with an error."""

    @abstractmethod
    def frames(self) -> AsyncIterator[bytes]:
        """Every frame, in order; a failure after the 200 becomes the `failure` frames."""

    @abstractmethod
    def failure(self, error: APIError) -> list[bytes]:
        """The frames that end the stream with `error` (the HTTP status is already 200)."""


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) response was ready."""


async def _unless_client_leaves(run: Any, raw_request: Request) -> Completion:
    """`run`'s result; if the client disconnects first, `run` is cancelled (aborting the request) and
    ClientGone raised."""
    work = asyncio.ensure_future(run)
    watch = asyncio.ensure_future(_client_gone(raw_request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # the runner's cleanup runs: abort, release
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientGone()
    return work.result()


async def _client_gone(raw_request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is that)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


def _body_size(raw_request: Request) -> int:
    declared = raw_request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0


def sampling_params(request: SamplingFields, *, prompt_len: int, max_model_len: int, max_tokens: int | None,
                    max_tokens_param: str, prompt_param: str, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, min_tokens: int = 1,
                    constraint: Constraint | None = None) -> SamplingParams:
    """OpenAI fields -> SamplingParams, checking the context window. max_tokens None: fill it; it may be 0
    only where `min_tokens` is 0 (an echo that just scores the prompt)."""
    remaining = max_model_len - prompt_len
    if remaining < 1:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                          f"has {prompt_len} tokens, which leaves no room for a completion. Please shorten the "
                          f"prompt.", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = remaining
    elif max_tokens < min_tokens:
        raise bad_request(f"{max_tokens_param} must be at least {min_tokens}, got {max_tokens}"
                          + (" (0 is allowed with echo)" if max_tokens == 0 else ""), param=max_tokens_param,
                          code="invalid_value")
    elif max_tokens > remaining:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                          f"completion). Please reduce the prompt or {max_tokens_param}.", param=max_tokens_param,
                          code="context_length_exceeded")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k in (None, -1) else request.top_k,
            seed=request.seed,  # None: the engine's rule for unseeded requests
            stop=request.stop_strings(),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=constraint,
        )
    except ValueError as exc:
        raise bad_request(str(exc), code="invalid_value") from exc
