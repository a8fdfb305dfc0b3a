"""Incremental detokenization: streamed text equals the whole decode, cut at the first stop string."""

from __future__ import annotations

import random
from typing import Sequence

import pytest

from subspec_core.detokenize import DetokenizedDelta, IncrementalDetokenizer, decode_whole

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "Emoji: 😀👍🏽🎉 and a family 👨‍👩‍👧 and flags 🇫🇷🇯🇵.",
    "中文测试：你好，世界！这是一个句子。",
    "Accents: café, naïve, Ångström, São Paulo, Œuvre, ĳ, Ωμέγα.",
    "def f(x):\n    return x ** 2  # code\n\n\ttabs\tand  double  spaces ",
    " leading space and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters, русский текст, العربية",
]


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], sizes: Sequence[int]) -> tuple[list[DetokenizedDelta], str]:
    """Feed `ids` in chunks of the given sizes (cycled); return the deltas and the flushed tail."""
    deltas, i, k = [], 0, 0
    while i < len(ids) and not detok.stopped:
        n = sizes[k % len(sizes)]
        deltas.append(detok.add(ids[i : i + n]))
        i, k = i + n, k + 1
    return deltas, detok.flush()


def streamed_text(deltas: list[DetokenizedDelta], tail: str) -> str:
    return "".join(d.text for d in deltas) + tail


@pytest.fixture(scope="module")
def chat_prompt(default_tokenizer) -> list[int]:
    """A real prompt ending in the assistant header, as the server sends it."""
    messages = [{"role": "user", "content": "Say something."}]
    return list(default_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


# --- the real default tokenizer (byte-level BPE) ---------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_whole(default_tokenizer, chat_prompt, text):
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    deltas, tail = stream(IncrementalDetokenizer(default_tokenizer, prompt_token_ids=chat_prompt), ids, [1])
    assert streamed_text(deltas, tail) == text == decode_whole(default_tokenizer, ids, prompt_token_ids=chat_prompt)
    assert all("\ufffd" not in d.text for d in deltas), "a broken multi-byte character was emitted"
    assert tail == ""
    assert sum(d.kept_tokens for d in deltas) == len(ids) and not any(d.stopped for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_random_chunkings_equal_whole(default_tokenizer, chat_prompt, text):
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(text)
    for _ in range(20):
        sizes = [rng.randint(1, 7) for _ in range(len(ids))]
        deltas, tail = stream(IncrementalDetokenizer(default_tokenizer, prompt_token_ids=chat_prompt), ids, sizes)
        assert streamed_text(deltas, tail) == text
        assert all("\ufffd" not in d.text for d in deltas)


def test_emoji_bytes_are_held_until_complete(default_tokenizer):
    ids = default_tokenizer.encode("Hi 😀", add_special_tokens=False)
    pieces = [default_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the emoji should span byte tokens for this test to mean anything"
    detok = IncrementalDetokenizer(default_tokenizer, prompt_token_ids=[])
    texts = [detok.add([i]).text for i in ids]
    assert "".join(texts) == "Hi 😀" and texts[-1].endswith("😀")
    assert all("\ufffd" not in t for t in texts)


def test_leading_space_preserved(default_tokenizer):
    prompt = default_tokenizer.encode("The answer is", add_special_tokens=False)
    ids = default_tokenizer.encode("The answer is 42.", add_special_tokens=False)[len(prompt):]
    detok = IncrementalDetokenizer(default_tokenizer, prompt_token_ids=prompt)
    first = detok.add(ids[:1]).text
    assert first.startswith(" ")
    assert first + detok.add(ids[1:]).text + detok.flush() == " 42."


def test_special_tokens_skipped(default_tokenizer, chat_prompt):
    eos = default_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = default_tokenizer.encode("Done.", add_special_tokens=False) + [eos]
    deltas, tail = stream(IncrementalDetokenizer(default_tokenizer, prompt_token_ids=chat_prompt), ids, [1])
    assert streamed_text(deltas, tail) == "Done."


def test_stop_string_spanning_chunks(default_tokenizer, chat_prompt):
    text = "First line. Then STOP_HERE and more text after it."
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    for sizes in ([1], [2], [3, 1], [5]):
        detok = IncrementalDetokenizer(default_tokenizer, prompt_token_ids=chat_prompt, stop=["STOP_HERE"])
        deltas, tail = stream(detok, ids, sizes)
        assert streamed_text(deltas, tail) == "First line. Then "
        assert deltas[-1].stopped and detok.stopped and tail == ""
        kept = sum(d.kept_tokens for d in deltas)
        # the kept ids are exactly those up to the one that completed the stop string
        assert "STOP_HERE" in default_tokenizer.decode(ids[:kept])
        assert "STOP_HERE" not in default_tokenizer.decode(ids[: kept - 1])


def test_stop_at_very_first_token(default_tokenizer):
    ids = default_tokenizer.encode("Hello there", add_special_tokens=False)
    detok = IncrementalDetokenizer(default_tokenizer, prompt_token_ids=[1], stop=["Hello"])
    delta = detok.add(ids)
    assert delta == DetokenizedDelta("", True, 1)
    assert detok.add(ids) == DetokenizedDelta("", True, 0)
    assert detok.flush() == "" and detok.text == ""


def test_earliest_of_several_stop_strings_wins(default_tokenizer):
    text = "alpha beta gamma delta"
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    for stops, expected in [
        (["delta", "beta"], "alpha "),
        (["gamma", "a beta"], "alph"),
        (["ta gam", "beta"], "alpha "),
        (["zzz", "delta"], "alpha beta gamma "),
    ]:
        for sizes in ([1], [len(ids)]):
            deltas, tail = stream(IncrementalDetokenizer(default_tokenizer, stop=stops), ids, sizes)
            assert streamed_text(deltas, tail) == expected == decode_whole(default_tokenizer, ids, stop=stops)


def test_stop_string_prefix_is_held_then_released(default_tokenizer):
    ids = default_tokenizer.encode("a ## b ###", add_special_tokens=False)
    detok = IncrementalDetokenizer(default_tokenizer, stop=["###"])
    deltas, tail = stream(detok, ids, [1])
    assert streamed_text(deltas, tail) == "a ## b "
    # a generation that ends inside a possible stop-string prefix gets the prefix back from flush()
    detok = IncrementalDetokenizer(default_tokenizer, stop=["###"])
    ids = default_tokenizer.encode("end ##", add_special_tokens=False)
    emitted = "".join(detok.add([i]).text for i in ids)
    assert detok.text == "end ##" and not emitted.endswith("##")
    assert emitted + detok.flush() == "end ##"


def test_multibyte_stop_string(default_tokenizer):
    text = "Smile 😀 then stop 停止 never this"
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    for sizes in ([1], [4]):
        deltas, tail = stream(IncrementalDetokenizer(default_tokenizer, stop=["停止"]), ids, sizes)
        assert streamed_text(deltas, tail) == "Smile 😀 then stop "
        deltas, tail = stream(IncrementalDetokenizer(default_tokenizer, stop=["😀"]), ids, sizes)
        assert streamed_text(deltas, tail) == "Smile "


def test_random_texts_stops_and_chunkings_match_reference(default_tokenizer, chat_prompt):
    fragments = ["Hello", " world", "😀", "中文", " café", "\n", "###", " end", "STOP", "ST", "é", "🇯🇵", "  ", "."]
    rng = random.Random(1234)
    for _ in range(150):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 12)))
        stops = rng.sample(["STOP", "###", "end", "😀", "中", "o w", "\n\n", "é."], rng.randint(0, 3))
        ids = default_tokenizer.encode(text, add_special_tokens=False)
        sizes = [rng.randint(1, 5) for _ in range(8)]
        detok = IncrementalDetokenizer(default_tokenizer, prompt_token_ids=chat_prompt, stop=stops)
        deltas, tail = stream(detok, ids, sizes)
        expected = decode_whole(default_tokenizer, ids, prompt_token_ids=chat_prompt, stop=stops)
        assert streamed_text(deltas, tail) == expected, (text, stops, sizes)
        assert detok.stopped == any(s in text for s in stops)


# --- a SentencePiece-style tokenizer (Metaspace + byte fallback, like Llama 2 / Mistral) -------------


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """Character-level pieces with '▁' for spaces and <0xNN> byte fallback; decode strips a first space."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁"] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'"):
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_first_space_kept(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    ids = tok.encode("Hi there é😀!", add_special_tokens=False)  # '▁','H','i','▁','t',...
    prompt, output = [1] + ids[:3], ids[3:]
    assert tok.decode(output) == "there é😀!"  # decoding the output alone loses its first space
    for sizes in ([1], [2], [3], [len(output)]):
        deltas, tail = stream(IncrementalDetokenizer(tok, prompt_token_ids=prompt), output, sizes)
        assert streamed_text(deltas, tail) == " there é😀!" == decode_whole(tok, output, prompt_token_ids=prompt)
        assert all("\ufffd" not in d.text for d in deltas)


def test_sentencepiece_stop_on_byte_fallback(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    ids = tok.encode("go 😀 now", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_token_ids=[1], stop=["😀"])
    deltas, tail = stream(detok, ids, [1])
    assert streamed_text(deltas, tail) == "go "
    # the stop completes on the emoji's last byte token: '▁','g','o','▁', then 4 byte tokens
    assert sum(d.kept_tokens for d in deltas) == 8


# --- a fake byte tokenizer: each id < 256 is one byte, 256 is a special token ------------------------


class ByteTokenizer:
    """decode() renders bytes as UTF-8 with '\\ufffd' for invalid or incomplete sequences, like HF's byte BPE."""

    special = 256

    def __init__(self) -> None:
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        self.decoded_lengths.append(len(ids))
        return bytes(i for i in ids if i != self.special).decode("utf-8", errors="replace")


def b(text: str) -> list[int]:
    return list(text.encode())


def test_incomplete_utf8_held_back():
    detok = IncrementalDetokenizer(ByteTokenizer())
    emoji = b("😀")
    assert [detok.add([x]).text for x in emoji] == ["", "", "", "😀"]
    assert detok.add(b("é")[:1]) == DetokenizedDelta("", False, 1)
    assert detok.text == "😀\ufffd"
    assert detok.flush() == "\ufffd"  # a generation cut mid-character ends as decode renders it


def test_text_before_a_broken_tail_is_emitted_at_once():
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add(b("ab") + b("中")[:2]).text == "ab"
    assert detok.add(b("中")[2:]).text == "中"


def test_invalid_bytes_are_emitted_once_followed():
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add([0xFF]).text == ""
    assert detok.add(b("x")).text == "\ufffdx"
    assert detok.flush() == ""


def test_stop_in_a_batch_reports_kept_tokens():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["cd"])
    assert detok.add(b("ab")) == DetokenizedDelta("ab", False, 2)
    assert detok.add(b("cdefg")) == DetokenizedDelta("", True, 2)
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["bc"])
    assert detok.add(b("ab")) == DetokenizedDelta("a", False, 2)  # 'b' may start 'bc'
    assert detok.add(b("xbcz")) == DetokenizedDelta("bx", True, 3)


def test_special_ids_skipped_and_ignored_by_stops():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["ab"])
    assert detok.add([ord("a"), 256, ord("c")]).text == "ac"
    assert detok.add([ord("a"), 256, ord("b")]) == DetokenizedDelta("", True, 3)


def test_prompt_context_not_in_output():
    prompt = b("Question: 中")
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt_token_ids=prompt, stop=["Question"])
    assert detok.add(b(" answer")).text == " answer"
    assert not detok.stopped


def test_prompt_ending_mid_character_is_not_continued():
    prompt = b("x") + b("中")[:1]
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt_token_ids=prompt)
    assert detok.add(b(" ok")).text + detok.flush() == decode_whole(ByteTokenizer(), b(" ok"), prompt_token_ids=prompt)


def test_decode_work_is_bounded_per_token():
    """O(new tokens): each decode sees a short window, never the whole output."""
    tokenizer = ByteTokenizer()
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=b("prompt"))
    text = "Streaming 😀 中文 text. " * 200
    out = "".join(detok.add([x]).text for x in b(text)) + detok.flush()
    assert out == text
    assert max(tokenizer.decoded_lengths) <= 8
    assert len(tokenizer.decoded_lengths) <= 2 * len(b(text)) + 4


def test_lifecycle_errors():
    with pytest.raises(ValueError):
        IncrementalDetokenizer(ByteTokenizer(), stop=[""])
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add([]) == DetokenizedDelta("", False, 0)
    detok.flush()
    with pytest.raises(RuntimeError):
        detok.add(b("x"))
