"""POST /v1/completions: a plain prompt (text or token ids); `text_completion` bodies, with `echo` and the
legacy `logprobs` object (with echo: the prompt's tokens too, scored by the prefill)."""

from __future__ import annotations

from typing import Any, Sequence

from server.api.choices import ChoiceBuilder, ChoicesEndpoint
from server.api.endpoint import Prepared
from server.api.logprobs import CompletionLogprobs, TokenStrings, merge_completion_logprobs
from server.api.prompting import PromptBuilder
from server.api.schemas import CompletionRequest
from server.api.structured import checked, request_constraint
from subspec_core.types import TokenEvent


class CompletionChoiceBuilder(ChoiceBuilder):
    """Text and logprobs of one completion (the echoed prompt first), streamed and whole."""

    def __init__(self, *, strings: TokenStrings, logprobs: bool, echo_text: str | None = None,
                 prompt_ids: Sequence[int] = ()) -> None:
        self._logprobs = CompletionLogprobs(strings) if logprobs else None
        self._echo = echo_text
        self._prompt_ids = tuple(prompt_ids)
        self._text: list[str] = []
        self._parts: list[dict[str, Any]] = []
        self._finish = "stop"

    def on_event(self, event: TokenEvent) -> dict[str, Any] | None:
        text = event.text
        ids: tuple[int, ...] = event.token_ids
        entries: tuple = event.logprobs or ()
        if self._echo is not None:  # the first event: the prompt goes first
            text = self._echo + text
            ids = self._prompt_ids + ids
            scored = event.prompt_logprobs or (None,) * (len(self._prompt_ids) - 1)
            entries = (None, *scored, *entries)  # nothing predicts the first prompt token
            self._echo = None
        logprobs = None
        if self._logprobs is not None and ids:
            logprobs = self._logprobs.add(entries, ids)
            self._parts.append(logprobs)
        if not text and logprobs is None:
            return None
        self._text.append(text)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}

    def closing(self, finish_reason: str) -> list[dict[str, Any]]:
        self._finish = finish_reason
        return [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}]

    def whole(self) -> dict[str, Any]:
        logprobs = None if self._logprobs is None else merge_completion_logprobs(self._parts)
        return {"index": 0, "text": "".join(self._text), "logprobs": logprobs, "finish_reason": self._finish}


class CompletionEndpoint(ChoicesEndpoint):
    endpoint = "/v1/completions"
    id_prefix = "cmpl-"
    chunk_object = "text_completion"
    body_object = "text_completion"
    prompt_param = "prompt"

    def prepare(self, request: CompletionRequest, prompts: PromptBuilder, max_model_len: int) -> Prepared:
        prompt = prompts.single_prompt(request.prompt)
        prompt_ids = prompts.completion(prompt, max_model_len=max_model_len)
        echo_text = None
        if request.echo:
            echo_text = prompt if isinstance(prompt, str) else prompts.decode(prompt_ids)
        builder = CompletionChoiceBuilder(strings=self.context.strings, logprobs=request.logprobs is not None,
                                          echo_text=echo_text, prompt_ids=prompt_ids)
        return Prepared(prompt_ids, builder, request.max_tokens, "max_tokens", logprobs=request.logprobs,
                        prompt_logprobs=request.logprobs if request.echo else None,
                        min_tokens=0 if request.echo else 1, constraint=checked(request_constraint(request)))
