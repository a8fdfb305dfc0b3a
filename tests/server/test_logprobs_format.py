"""Logprobs in OpenAI's shapes (server/api/logprobs.py): token text and exact bytes for byte-level BPE and
SentencePiece tokenizers, the legacy completions object, and -inf made JSON-safe."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from server.api.logprobs import CompletionLogprobs, TokenStrings, chat_logprobs, merge_completion_logprobs
from subspec_core.types import TokenLogprob


def test_byte_level_tokens_carry_their_exact_bytes(default_tokenizer):
    strings = TokenStrings(default_tokenizer)
    text = " héllo 你好 🎉\n\tend"
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(bytes(strings.bytes(i)) for i in ids).decode() == text
    assert any(strings.text(i) == "\ufffd" for i in ids)  # a CJK character split over tokens: each shows U+FFFD
    im_end = default_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert strings.text(im_end) == "<|im_end|>"  # special tokens as written


class SentencePieceLike:
    """The parts of a Llama-2-style tokenizer TokenStrings reads: ▁ for a space, <0xNN> byte fallback."""

    # what a Llama-2 fast tokenizer's backend decoder prints as
    backend_tokenizer = SimpleNamespace(decoder='Sequence(decoders=[Replace(pattern=String("▁"), content=" "), '
                                                'ByteFallback(), Fuse(), Strip(content=" ", start=1, stop=0)])')
    all_special_ids = [1]
    pieces = {1: "<s>", 5: "▁Hello", 6: "<0xE4>", 7: "world"}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces[token_id]

    def decode(self, ids: list[int]) -> str:
        raise AssertionError("not needed for these tokens")


def test_sentencepiece_tokens():
    strings = TokenStrings(SentencePieceLike())
    assert [strings.text(i) for i in (1, 5, 7)] == ["<s>", " Hello", "world"]
    assert strings.bytes(6) == [0xE4] and strings.text(6) == "\ufffd"


class CharTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_chat_and_completion_shapes_and_infinite_logprobs():
    strings = TokenStrings(CharTokenizer())
    entries = [TokenLogprob(ord("a"), -0.5, ((ord("a"), -0.5), (ord("b"), -math.inf))),
               TokenLogprob(ord("c"), -2.0, ((ord("d"), -0.1),))]
    chat = chat_logprobs(entries, strings)
    json.dumps(chat, allow_nan=False)  # no -inf in the JSON
    assert chat["content"][0] == {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]}, {"token": "b", "logprob": -9999.0, "bytes": [98]}]}
    legacy = CompletionLogprobs(strings)
    first = legacy.add([None, entries[0]], [ord("x"), ord("a")])  # an echoed prompt token, then "a"
    second = legacy.add([entries[1]], [ord("c")])
    assert second == {"tokens": ["c"], "token_logprobs": [-2.0], "top_logprobs": [{"d": -0.1, "c": -2.0}],
                      "text_offset": [2]}  # the chosen token joins the top dict; offsets run on
    assert merge_completion_logprobs([first, second]) == {
        "tokens": ["x", "a", "c"], "token_logprobs": [None, -0.5, -2.0],
        "top_logprobs": [None, {"a": -0.5, "b": -9999.0}, {"d": -0.1, "c": -2.0}], "text_offset": [0, 1, 2]}
