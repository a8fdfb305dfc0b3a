"""POST /v1/chat/completions: messages through the chat template; `chat.completion(.chunk)` bodies."""

from __future__ import annotations

from typing import Any

from server.endpoint import OpenAIEndpoint
from server.schemas import ChatCompletionRequest
from server.serving import Completion, Job, usage


class ChatEndpoint(OpenAIEndpoint):
    endpoint = "/v1/chat/completions"
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    prompt_param = "messages"

    def prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        return self.prompts.chat(request.messages)

    def max_tokens(self, request: ChatCompletionRequest) -> tuple[int | None, str]:
        if request.max_completion_tokens is not None:
            return request.max_completion_tokens, "max_completion_tokens"
        return request.max_tokens, "max_tokens"

    def opening_choice(self) -> dict[str, Any]:
        # OpenAI's first chunk carries the role and an empty content.
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def text_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if finish_reason is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def response_body(self, job: Job, created: int, result: Completion) -> dict[str, Any]:
        return {
            "id": job.request_id,
            "object": "chat.completion",
            "created": created,
            "model": self.service.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(len(job.prompt_ids), result.completion_tokens),
            "system_fingerprint": None,
        }
