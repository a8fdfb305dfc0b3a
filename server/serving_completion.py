"""POST /v1/completions: a plain prompt (text or token ids); `text_completion` bodies."""

from __future__ import annotations

from typing import Any

from server.endpoint import OpenAIEndpoint
from server.schemas import CompletionRequest
from server.serving import Completion, Job, usage


class CompletionEndpoint(OpenAIEndpoint):
    endpoint = "/v1/completions"
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    prompt_param = "prompt"

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        return self.prompts.completion(request.prompt)

    def max_tokens(self, request: CompletionRequest) -> tuple[int | None, str]:
        return request.max_tokens, "max_tokens"

    def opening_choice(self) -> None:
        return None

    def text_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def response_body(self, job: Job, created: int, result: Completion) -> dict[str, Any]:
        return {
            "id": job.request_id,
            "object": "text_completion",
            "created": created,
            "model": self.service.model_name,
            "choices": [self.text_choice(result.text, result.finish_reason)],
            "usage": usage(len(job.prompt_ids), result.completion_tokens),
            "system_fingerprint": None,
        }
