"""Prometheus metrics (prefix `subspec_`), in a registry owned by one app (never the global one).

Speculation is also counted under vLLM's spec-decode names and semantics (`vllm:spec_decode_num_drafts`,
`..._num_draft_tokens`, `..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`, labelled by
`model_name` and `engine`), so dashboards and benchmark tools built for vLLM read them unchanged (e.g. mean
acceptance length = 1 + accepted / drafts). A draft is one verified tree; its draft tokens are the tree's
verified nodes; accepted tokens exclude the bonus token; position p counts drafts whose path accepted at
least p + 1 tokens.

`ServerMetrics` holds the metric objects; `RequestRecord` measures one request (queue time, time to first
token, inter-token gaps, speculation counters, end-to-end latency) and records its outcome exactly once.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.edge.request_id import log_suffix
from subspec_core.types import RequestStats, TokenEvent

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ACCEPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)
_THROUGHPUT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

STATUS_CLIENT_CLOSED = 499  # nginx's "client closed request": the client went away mid-request


class _EngineStateCollector(Collector):
    """Worker readiness and restarts, read from the engine client at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self):  # type: ignore[override]
        status = self._status()
        ready = GaugeMetricFamily("subspec_worker_ready", "1 when an engine worker is loaded and serving")
        ready.add_metric([], 1.0 if status.get("state") == "ready" else 0.0)
        restarts = CounterMetricFamily("subspec_worker_restarts", "Engine workers started to replace one that died")
        restarts.add_metric([], float(status.get("worker_restarts", 0)))
        return [ready, restarts]


class ServerMetrics:
    """All metrics of one server instance, in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("subspec_requests", "Requests by endpoint and final status "
                                "(499: client disconnected, 504: deadline exceeded)", ["endpoint", "status"],
                                registry=r)
        self.queue_depth = Gauge("subspec_queue_depth", "Requests admitted and waiting for the GPU", registry=r)
        self.running = Gauge("subspec_requests_running", "Requests running on the GPU (at most max_num_seqs)",
                             registry=r)
        # observed once per batched iteration (max_num_seqs > 1): its mean is the sequences each weight stream served
        self.batch_size = Histogram("subspec_batch_size", "Sequences per target forward (one per batched iteration; "
                                    "only with max_num_seqs > 1)", buckets=_BATCH_BUCKETS, registry=r)
        self.forward_rows = Histogram("subspec_forward_rows", "Rows per batched target forward: every sequence's tree "
                                      "(or token) and prompt chunk (only with max_num_seqs > 1)", buckets=_ROW_BUCKETS,
                                      registry=r)
        self.prompt_tokens = Counter("subspec_prompt_tokens", "Prompt tokens of requests that ran", registry=r)
        self.generation_tokens = Counter("subspec_generation_tokens", "Tokens generated", registry=r)
        self.queue_time = Histogram("subspec_request_queue_seconds", "Time from arrival to getting the GPU",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("subspec_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("subspec_inter_token_latency_seconds",
                                     "Gap between consecutive token events (one per verification; each "
                                     "may carry several tokens)", buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("subspec_time_per_output_token_seconds",
                                               "Per request: (end - first token) / (tokens - 1)",
                                               buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("subspec_e2e_request_latency_seconds", "Arrival to last token, finished requests",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.accept_length = Histogram("subspec_accept_length", "Tokens produced per target forward "
                                       "(accepted draft tokens + 1 bonus)", buckets=_ACCEPT_BUCKETS, registry=r)
        self.drafted = Counter("subspec_drafted_tokens", "Draft tree nodes proposed and verified", registry=r)
        self.accepted = Counter("subspec_accepted_tokens", "Drafted tokens the target accepted", registry=r)
        self.iterations = Counter("subspec_iterations", "Target forwards after prefill", registry=r)
        self.prefill_seconds = Counter("subspec_prefill_seconds", "Engine time in prefill", registry=r)
        self.draft_seconds = Counter("subspec_draft_seconds", "Engine time drafting trees", registry=r)
        self.verify_seconds = Counter("subspec_verify_seconds", "Engine time in target verification", registry=r)
        self.h2d_bytes = Counter("subspec_h2d_bytes", "Weight bytes streamed host-to-device", registry=r)
        self.prefix_cache_hits = Counter("subspec_prefix_cache_hit_tokens", "Prompt tokens whose KV rows were kept "
                                         "from the previous request (prefix reuse), not prefilled", registry=r)
        self.throughput = Gauge("subspec_generation_throughput_tokens_per_second",
                                "Generated tokens per second of the last finished request (from getting "
                                "the GPU to its last token)", registry=r)
        self.throughput_hist = Histogram("subspec_request_generation_throughput_tokens_per_second",
                                         "Generated tokens per second per finished request",
                                         buckets=_THROUGHPUT_BUCKETS, registry=r)
        labels = ["model_name", "engine"]
        self.vllm_drafts = Counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts (verified trees)",
                                   labels, registry=r)
        self.vllm_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens (verified "
                                         "tree nodes)", labels, registry=r)
        self.vllm_accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens",
                                            labels, registry=r)
        self.vllm_accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                             "Accepted tokens per draft position", [*labels, "position"], registry=r)
        # vLLM's scheduler gauges under its names and labels (dashboards and autoscalers built for vLLM)
        self.vllm_running = Gauge("vllm:num_requests_running", "Number of requests running on the GPU", labels,
                                  registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed", labels,
                                  registry=r)
        self.model_name = ""

    def bind(self, *, waiting: Callable[[], int], running: Callable[[], int],
             engine_status: Callable[[], dict[str, Any]], model_name: str = "") -> None:
        """Read the live gauges from their owners at scrape time; label the vLLM-named counters."""
        self.model_name = model_name
        for counter in (self.vllm_drafts, self.vllm_draft_tokens, self.vllm_accepted_tokens):
            counter.labels(model_name=model_name, engine="0")  # exported (at 0) before the first request
        self.queue_depth.set_function(lambda: float(waiting()))
        self.running.set_function(lambda: float(running()))
        self.vllm_waiting.labels(model_name=model_name, engine="0").set_function(lambda: float(waiting()))
        self.vllm_running.labels(model_name=model_name, engine="0").set_function(lambda: float(running()))
        self.registry.register(_EngineStateCollector(engine_status))

    def observe_step(self, sequences: int, rows: int) -> None:
        """One batched iteration: the sequences and rows its target forward served."""
        self.batch_size.observe(sequences)
        self.forward_rows.observe(rows)

    def start(self, endpoint: str) -> RequestRecord:
        return RequestRecord(self, endpoint)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()


class RequestRecord:
    """Timings and counters of one request; `finish` records its outcome once (later calls are ignored) and, for
    an admitted request, logs it in one line."""

    def __init__(self, metrics: ServerMetrics, endpoint: str) -> None:
        self._m = metrics
        self.endpoint = endpoint
        self.request_id: str | None = None  # set when admitted
        self.correlation_id: str | None = None
        self.prompt_tokens = 0
        self.arrival = time.monotonic()
        self.started: float | None = None
        self.first_token: float | None = None
        self.last_event: float | None = None
        self.tokens = 0
        self.finished = False

    def name(self, request_id: str, prompt_tokens: int, correlation_id: str | None) -> None:
        """The request was admitted as `request_id` (the client's X-Request-Id: `correlation_id`)."""
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.correlation_id = correlation_id

    def on_start(self, prompt_tokens: int) -> None:
        """The request got the GPU."""
        self.started = time.monotonic()
        self._m.queue_time.observe(self.started - self.arrival)
        self._m.prompt_tokens.inc(prompt_tokens)

    def on_event(self, event: TokenEvent) -> None:
        now = time.monotonic()
        if event.token_ids:
            if self.first_token is None:
                self.first_token = now
                self._m.ttft.observe(now - self.arrival)
            elif self.last_event is not None:
                self._m.inter_token.observe(now - self.last_event)
            self.last_event = now
            self.tokens += len(event.token_ids)
            self._m.generation_tokens.inc(len(event.token_ids))
        if event.accept_length is not None:
            self._m.accept_length.observe(event.accept_length)
            self._m.accepted.inc(max(event.accept_length - 1, 0))
            self._m.iterations.inc()
        if event.drafted_tokens:
            self._m.drafted.inc(event.drafted_tokens)
            self._on_draft(event.drafted_tokens, max((event.accept_length or 1) - 1, 0))
        if event.stats is not None:
            self._on_stats(event.stats)

    def _on_draft(self, draft_tokens: int, accepted: int) -> None:
        """One verified tree, in vLLM's terms."""
        labels = {"model_name": self._m.model_name, "engine": "0"}
        self._m.vllm_drafts.labels(**labels).inc()
        self._m.vllm_draft_tokens.labels(**labels).inc(draft_tokens)
        self._m.vllm_accepted_tokens.labels(**labels).inc(accepted)
        for position in range(accepted):
            self._m.vllm_accepted_per_pos.labels(**labels, position=str(position)).inc()

    def _on_stats(self, stats: RequestStats) -> None:
        self._m.prefill_seconds.inc(stats.prefill_s)
        self._m.draft_seconds.inc(stats.draft_s)
        self._m.verify_seconds.inc(stats.verify_s)
        self._m.h2d_bytes.inc(stats.h2d_bytes)
        self._m.prefix_cache_hits.inc(stats.cached_prompt_tokens)

    def finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        self._m.count(self.endpoint, status)
        now = time.monotonic()
        if self.request_id is not None:
            first = "-" if self.first_token is None else f"{self.first_token - self.arrival:.2f} s"
            logger.info("%s: status %d, %d prompt + %d generated tokens, first token %s, total %.2f s%s",
                        self.request_id, status, self.prompt_tokens, self.tokens, first, now - self.arrival,
                        log_suffix(self.correlation_id))
        if status != 200:
            return
        self._m.e2e.observe(now - self.arrival)
        if self.first_token is not None and self.tokens > 1:
            self._m.time_per_output_token.observe((now - self.first_token) / (self.tokens - 1))
        if self.started is not None and self.tokens > 0 and now > self.started:
            rate = self.tokens / (now - self.started)
            self._m.throughput.set(rate)
            self._m.throughput_hist.observe(rate)


class ResponseCounter:
    """ASGI middleware: counts the responses of paths for which `label(path)` is not None, by status.
    (The completion endpoints count their own requests: a stream's outcome is known only at its end.)"""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics, label: Callable[[str], str | None]) -> None:
        self.app = app
        self._metrics = metrics
        self._label = label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        label = self._label(scope["path"]) if scope["type"] == "http" else None
        if label is None:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._metrics.count(label, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
