"""Turn chat messages or a completion prompt into prompt token ids, with the model's own tokenizer.

Runs in the API process with a weights-free tokenizer (`subspec_core.loading.load_tokenizer`), so a bad
or too-long prompt is rejected before it is queued. Chat uses the tokenizer's chat template; the templated
text already holds any BOS token, so it is encoded without adding special tokens again.
"""

from __future__ import annotations

from typing import Any, Sequence

from server.errors import APIError, bad_request
from server.schemas import ChatMessage


class PromptBuilder:
    """Chat template + tokenization for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = len(tokenizer)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def chat(self, messages: Sequence[ChatMessage], *, param: str = "messages") -> list[int]:
        """Prompt ids for a conversation, ending with the assistant's turn. `param` names the request field
        the messages came from, in errors."""
        if not self.has_chat_template:
            raise APIError(400, "this model's tokenizer has no chat template, so it cannot format a "
                                "conversation; use /v1/completions with a plain prompt, or serve the "
                                "model with a tokenizer that has one (--tokenizer)",
                           param=param, code="no_chat_template")
        conversation = []
        for message in messages:
            entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                     "content": message.text()}
            if message.name:
                entry["name"] = message.name
            conversation.append(entry)
        try:
            text = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template rejected the conversation (e.g. roles must alternate)
            raise bad_request(f"the chat template rejected these messages: {exc}", param=param) from exc
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def completion(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
        """Prompt ids for one completion prompt: text (special tokens added) or token ids."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request("batched prompts are not supported: send one prompt per request",
                                  param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(self._tokenizer.encode(prompt, add_special_tokens=True)) if prompt else []
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self._vocab_size]
            if bad:
                raise bad_request(f"token ids must be in [0, {self._vocab_size}); got {bad[:5]}", param="prompt")
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        return ids
