"""A small deterministic stand-in for `subspec_core.engine.Engine`, for server unit tests.

One character is one token (the token id is its code point). The engine "generates" a fixed script,
`chars_per_event` tokens per iteration, sleeping `delay_s` per iteration, and honours max_tokens, stop
strings, ignore_eos and logprobs (`fake_logprob`: made-up but deterministic values, the chosen token first).
An iteration is `levels_per_event` equal "levels" (like draft levels); the `cancelled` check is asked before
each, and each started level is appended to `trace_path` (if set) as "request_id event level", so a test in
another process can count the work done after an abort. Prompts containing a trigger word misbehave on purpose:
  RAISE_VALUE    generate() raises ValueError before any output (-> HTTP 400)
  RAISE_RUNTIME  raises RuntimeError after the first event (-> 500 for that request only)
  EXIT_WORKER    kills the process after the first event (worker-crash tests; process client only)
  DEVICE_LOST    raises torch's AcceleratorError (a poisoned CUDA context) after the first event
  HANG           blocks for `hang_s` in the second iteration (abort watchdog tests)
Everything is module level and picklable, so a spawned worker can build it from a functools.partial.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from subspec_core.types import FINISH_LENGTH, FINISH_STOP, GenerationRequest, RequestStats, TokenEvent, TokenLogprob

SCRIPT = "Hello! 你好，世界。This is a fake reply from a fake engine."


HERMES_FAKE_TEMPLATE = "fake-template with tools as <tool_call>...</tool_call>"


class FakeTokenizer:
    """Code-point tokenizer with a trivial chat template (or none). With `HERMES_FAKE_TEMPLATE` as its
    template it "supports tools" in the Hermes format: tools and calls are rendered as JSON lines."""

    def __init__(self, chat_template: str | None = "fake-template") -> None:
        self.chat_template = chat_template
        self.template_calls: list[dict] = []  # keyword arguments of each apply_chat_template call

    def __len__(self) -> int:
        return 0x110000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, tools: list[dict] | None = None, **kwargs: object) -> str:
        self.template_calls.append({"tools": tools, **kwargs})
        roles = [m["role"] for m in conversation]
        if roles.count("system") > 1:
            raise ValueError("only one system message is allowed")
        text = "".join(f"<tools>{json.dumps(tool)}\n" for tool in tools or ())
        for m in conversation:
            calls = "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>" for c in m.get("tool_calls", ()))
            text += f"<{m['role']}>{m['content']}{calls}\n"
        return text + ("<assistant>" if add_generation_prompt else "")


def fake_logprob(token_id: int, position: int, top: int) -> TokenLogprob:
    """The fake engine's logprob for `token_id` at `position`, with `top` alternatives (it is the first)."""
    value = -0.25 * (position % 4) - 0.125
    return TokenLogprob(token_id, value, tuple((token_id + k, value - k) for k in range(top)))


def render_reply(max_tokens: int, stop: tuple[str, ...] = (), ignore_eos: bool = False,
                 script: str = SCRIPT) -> tuple[str, str]:
    """The text and finish reason the fake engine produces for these settings."""
    source = script * (max_tokens // len(script) + 1) if ignore_eos else script
    text = source[:max_tokens]
    cut = [text.find(s) for s in stop if s in text]
    if cut:
        return text[:min(cut)], FINISH_STOP
    return text, FINISH_LENGTH if len(text) == max_tokens else FINISH_STOP


@dataclass
class FakeEngine:
    """Duck-typed Engine: model_name, max_model_len, tokenizer, generate()."""

    delay_s: float = 0.0
    chars_per_event: int = 3
    max_model_len: int = 256
    model_name: str = "fake-model"
    script: str = SCRIPT
    hang_s: float = 30.0
    levels_per_event: int = 1
    trace_path: str | None = None
    gate: threading.Event | None = None  # when given, generation starts only once it is set
    max_num_seqs: int = 1  # > 1: batch_decoder() gives a FakeBatch, and the worker decodes requests together

    def __post_init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.served: list[str] = []  # request ids in the order generation started
        self.requests: list[GenerationRequest] = []  # ... and the requests themselves
        self.finished: list[str] = []  # ... that ran to their last event
        self.closed_early: list[str] = []  # ... whose generator was closed before the end (aborts)
        self.batch_sizes: list[int] = []  # members of each FakeBatch step

    def generate(self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None,
                 paced: bool = True) -> Iterator[TokenEvent]:
        """The script's events; `paced` False: no per-level work or cancel checks (a FakeBatch does them once per
        step for all its requests)."""
        prompt = self.tokenizer.decode(list(request.prompt_token_ids))
        sampling = request.sampling
        if "RAISE_VALUE" in prompt:
            raise ValueError("the fake engine rejects this prompt")
        if len(request.prompt_token_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds max_model_len")
        return self._events(request, prompt, cancelled, paced)

    def batch_decoder(self) -> FakeBatch | None:
        """A FakeBatch when max_num_seqs > 1 (as Engine.batch_decoder), else None."""
        return FakeBatch(self) if self.max_num_seqs > 1 else None

    def _level(self, rid: str, event: int, level: int) -> None:
        if self.trace_path is not None:
            with open(self.trace_path, "a") as trace:
                trace.write(f"{rid} {event} {level}\n")
        time.sleep(self.delay_s / self.levels_per_event)

    def _events(self, request: GenerationRequest, prompt: str, cancelled: Callable[[], bool] | None,
                paced: bool = True) -> Iterator[TokenEvent]:
        rid = request.request_id
        self.served.append(rid)
        self.requests.append(request)
        if self.gate is not None:
            self.gate.wait(30)
        text, reason = render_reply(request.sampling.max_tokens, request.sampling.stop,
                                    request.sampling.ignore_eos, self.script)
        pieces = [text[i:i + self.chars_per_event] for i in range(0, len(text), self.chars_per_event)] or [""]
        stats = RequestStats(prompt_tokens=len(request.prompt_token_ids))
        prompt_ids = request.prompt_token_ids
        sampling = request.sampling
        prompt_logprobs = None if sampling.prompt_logprobs is None else tuple(
            fake_logprob(token, at, sampling.prompt_logprobs) for at, token in enumerate(prompt_ids) if at)
        position = len(prompt_ids)
        done = False
        try:
            for i, piece in enumerate(pieces):
                if i == 1 and "HANG" in prompt:
                    time.sleep(self.hang_s)  # deaf to `cancelled`: a hung step
                for level in range(self.levels_per_event if paced else 0):
                    if cancelled is not None and cancelled():
                        return  # stopped inside the step, like the real engine: no final event
                    self._level(rid, i, level)
                last = i == len(pieces) - 1
                ids = tuple(ord(c) for c in piece)
                stats.completion_tokens += len(ids)
                if i > 0:
                    stats.iterations += 1
                    stats.drafted_tokens += 4
                    stats.accepted_tokens += max(len(ids) - 1, 0)
                    stats.draft_s += 0.001
                    stats.verify_s += 0.002
                    stats.h2d_bytes += 1000
                else:
                    stats.prefill_s += 0.003
                if last:
                    done = True
                    self.finished.append(rid)
                logprobs = None if sampling.logprobs is None else tuple(
                    fake_logprob(token, position + k, sampling.logprobs) for k, token in enumerate(ids))
                position += len(ids)
                yield TokenEvent(rid, ids, piece, accept_length=len(ids) if i > 0 else None,
                                 drafted_tokens=4 if i > 0 else 0, finish_reason=reason if last else None,
                                 stats=stats if last else None, logprobs=logprobs,
                                 prompt_logprobs=prompt_logprobs if i == 0 else None)
                if "RAISE_RUNTIME" in prompt:
                    raise RuntimeError("the fake engine broke")
                if "EXIT_WORKER" in prompt:
                    os._exit(3)
                if "DEVICE_LOST" in prompt:
                    import torch  # only here: the fake engine otherwise runs without torch

                    raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        finally:
            if not done:
                self.closed_early.append(rid)


class FakeBatch:
    """`subspec_core.batch.BatchDecoder`'s interface over a FakeEngine: a step is one "forward" for every member
    (`levels_per_event` levels of `delay_s / levels_per_event` each, `stop` asked before each, whatever the number
    of members), then each member's next scripted event. An admitted request's first event comes from the next
    step (its prompt rides on that forward); `join` gives it at once. Each step's members are counted in the
    engine's `batch_sizes`."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self._members: dict[str, tuple[Iterator[TokenEvent], Callable[[], bool] | None]] = {}
        self.forward_rows = 0  # a row per member, as a plain step has

    @property
    def active(self) -> int:
        return len(self._members)

    @property
    def capacity(self) -> int:
        return self.engine.max_num_seqs

    @property
    def has_room(self) -> bool:
        return self.active < self.capacity

    def admit(self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None) -> None:
        if not self.has_room:
            raise RuntimeError("the batch is full")
        self._members[request.request_id] = (self.engine.generate(request, paced=False), cancelled)

    def join(self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None) -> TokenEvent:
        self.admit(request, cancelled=cancelled)
        return self._next(request.request_id)

    def leave(self, request_id: str) -> bool:
        member = self._members.pop(request_id, None)
        if member is not None:
            member[0].close()
        return member is not None

    def _next(self, request_id: str) -> TokenEvent:
        event = next(self._members[request_id][0])
        if event.finished:
            del self._members[request_id]
        return event

    def step(self, *, stop: Callable[[], bool] | None = None) -> list[TokenEvent]:
        for request_id, (_, cancelled) in list(self._members.items()):
            if cancelled is not None and cancelled():
                self.leave(request_id)
        if not self._members:
            return []
        levels = self.engine.levels_per_event
        for _ in range(levels):
            if stop is not None and stop():
                from subspec_core.cancel import GenerationCancelled  # the engine side's exception (imports torch)

                raise GenerationCancelled()
            time.sleep(self.engine.delay_s / levels)
        self.engine.batch_sizes.append(len(self._members))
        self.forward_rows = len(self._members)
        return [self._next(request_id) for request_id in list(self._members)]


def make_fake_engine(**kwargs: object) -> FakeEngine:
    """Picklable factory target for the process client (use functools.partial(make_fake_engine, ...))."""
    return FakeEngine(**kwargs)  # type: ignore[arg-type]


class FailingEngineFactory:
    """An engine factory that always fails (worker start-failure tests)."""

    def __call__(self) -> FakeEngine:
        raise RuntimeError("no such model")
