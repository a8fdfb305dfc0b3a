"""Log-probabilities in OpenAI's shapes, from the engine's `TokenLogprob`s (ids and floats).

- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": null}`;
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, parallel lists; with
  `echo` the first prompt token has `null` logprob and top logprobs (nothing predicts it).

A token's text is what it contributes to the output; `bytes` are its exact UTF-8 bytes, so a character split
across tokens (byte-level BPE) can be rebuilt from them even though each token's text shows U+FFFD.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from subspec_core.types import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens with this value too


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenStrings:
    """Text and bytes of single tokens for one tokenizer (byte-level BPE, SentencePiece, or decode)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        decoder = repr(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None))
        self._byte_level = "ByteLevel" in decoder
        self._metaspace = "▁" in decoder or "Metaspace" in decoder  # SentencePiece: ▁ is a space, <0xNN> a byte
        self._byte_table = _byte_level_table() if self._byte_level else {}
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._cache: dict[int, tuple[str, bytes]] = {}

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        raw = self._bytes(token_id)
        piece = raw.decode("utf-8", errors="replace"), raw
        self._cache[token_id] = piece
        return piece

    def _bytes(self, token_id: int) -> bytes:
        convert = getattr(self._tokenizer, "convert_ids_to_tokens", None)
        token = convert(token_id) if convert is not None else None
        if isinstance(token, str):
            if token_id in self._special:
                return token.encode()
            if self._byte_level and all(c in self._byte_table for c in token):
                return bytes(self._byte_table[c] for c in token)
            if self._metaspace:
                if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # byte fallback
                    return bytes([int(token[3:5], 16)])
                return token.replace("▁", " ").encode()
        # Unknown schemes: what decoding the token alone gives (right except for split characters).
        return self._tokenizer.decode([token_id]).encode()

    def text(self, token_id: int) -> str:
        return self._piece(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return list(self._piece(token_id)[1])


def chat_logprobs(entries: Sequence[TokenLogprob], strings: TokenStrings) -> dict[str, Any]:
    """The `logprobs` of a chat choice (or of one streamed chunk's tokens)."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": strings.text(token_id), "logprob": _finite(logprob), "bytes": strings.bytes(token_id)}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries], "refusal": None}


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built up over a (possibly streamed) response; `text_offset`
    counts characters from the start of the choice's text (the echoed prompt included)."""

    def __init__(self, strings: TokenStrings) -> None:
        self._strings = strings
        self._offset = 0

    def add(self, entries: Sequence[TokenLogprob | None], token_ids: Sequence[int]) -> dict[str, Any]:
        """Logprobs for `token_ids` (an entry per id; None where no logprob exists, the echoed first token).

        The top dict holds the most likely tokens and the chosen one, as OpenAI's does ("up to logprobs+1").
        """
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self._strings.text(token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            if entry is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(_finite(entry.logprob))
            top = {self._strings.text(t): _finite(v) for t, v in entry.top}
            top.setdefault(text, _finite(entry.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the per-chunk objects of one response into the whole response's object."""
    return {key: [value for part in parts for value in part[key]]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
