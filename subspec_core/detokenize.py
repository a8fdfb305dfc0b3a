"""Incremental detokenization with stop strings: token ids in, final text out, a piece at a time.

Two stages, each a small class:

1. `_DecodeWindow` turns tokens into *stable* text. It decodes only a short window of recent ids
   (the vLLM/TGI prefix/read offsets) so the cost is O(new tokens), and it holds back a trailing
   '\\ufffd' (an incomplete UTF-8 sequence, e.g. the first bytes of an emoji) until the bytes that
   complete it arrive. The window always starts one chunk back, so a token's leading space is
   decoded as it is in the middle of a text (SentencePiece strips the space of a *first* token).
2. `_StopFilter` cuts the text at the first stop string (OpenAI semantics: the stop string and
   everything after it are not output) and holds back any tail that could still become one.

The result is exactly `decode_whole(...)`: what one decode of all the ids, cut at the first stop
string, gives; the tests check that for every chunking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context; vLLM uses the same number


@dataclass(frozen=True)
class DetokenizedDelta:
    """What one `add()` produced.

    `text` is newly final text to emit now (may be ''). `stopped` means a stop string matched:
    generation must end, and `text` excludes the stop string and all after it. `kept_tokens` is how
    many of the ids passed to this `add()` belong to the output: those after the token that completed
    the stop string are dropped (all of them when not stopped).
    """

    text: str
    stopped: bool
    kept_tokens: int


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The one decode call used everywhere, so incremental and whole results agree.

    Cleanup of tokenization spaces is off: it rewrites ' .' as '.' depending on the *next* token,
    which would make already-emitted text wrong.
    """
    if not ids:
        return ""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _context_ids(tokenizer: Any, prompt_token_ids: Sequence[int]) -> list[int]:
    """The last few prompt ids, as left context for the first output token's leading space.

    Shortened while its text ends in an incomplete character, so the output's first bytes are never
    read as the continuation of a prompt character.
    """
    context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    while context and _decode(tokenizer, context).endswith(_REPLACEMENT):
        context.pop()
    return context


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop-string occurrence in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def decode_whole(
    tokenizer: Any, token_ids: Sequence[int], *, prompt_token_ids: Sequence[int] = (), stop: Sequence[str] = ()
) -> str:
    """The non-incremental reference: decode all output ids (after the same prompt context), cut at the first stop."""
    context = _context_ids(tokenizer, prompt_token_ids)
    text = _decode(tokenizer, context + list(token_ids))[len(_decode(tokenizer, context)):]
    cut = find_stop(text, stop)
    return text if cut < 0 else text[:cut]


@dataclass
class _DecodeWindow:
    """Token ids -> stable text, decoding only `ids[prefix:]`.

    `window` holds ids from the prefix offset on; `window[:read]` is already fully emitted and only
    serves as left context; `emitted` counts the characters of `decode(window)` already handed out.
    """

    tokenizer: Any
    window: list[int]
    read: int
    emitted: int
    tail: str = ""  # held-back text at the end: a run of '\ufffd' waiting for its remaining bytes

    def push(self, token_ids: Sequence[int]) -> str:
        """Add ids; return the text that became stable."""
        self.window.extend(token_ids)
        full = _decode(self.tokenizer, self.window)
        stable = len(full.rstrip(_REPLACEMENT))
        # Text before a trailing '\ufffd' run never changes when more bytes arrive, so emit it now.
        piece = full[self.emitted:stable] if stable > self.emitted else ""
        self.emitted = max(self.emitted, stable)
        if stable == len(full):
            # Everything decoded is complete: slide the window so that the ids just added become the
            # left context of the next call, which keeps each decode short.
            self.window = self.window[self.read:]
            self.read = len(self.window)
            self.emitted = len(_decode(self.tokenizer, self.window))
            self.tail = ""
        else:
            self.tail = full[self.emitted:]
        return piece

    def snapshot(self) -> _DecodeWindow:
        return _DecodeWindow(self.tokenizer, list(self.window), self.read, self.emitted, self.tail)


@dataclass
class _StopFilter:
    """Stable text -> output text, cut at the first stop string.

    `pending` is the longest tail of the text so far that is a proper prefix of some stop string: it
    is held back until the next text shows whether the stop string completes.
    """

    stop: tuple[str, ...]
    pending: str = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text to emit, whether a stop string matched)."""
        if not self.stop:
            return text, False
        buffer = self.pending + text
        # A match cannot start in text already emitted: its start would have been held in `pending`.
        cut = find_stop(buffer, self.stop)
        if cut >= 0:
            self.pending = ""
            return buffer[:cut], True
        hold = self._held_length(buffer)
        self.pending = buffer[len(buffer) - hold:]
        return buffer[: len(buffer) - hold], False

    def _held_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:k]):
                    best = k
                    break
        return best


class IncrementalDetokenizer:
    """Streams a generation's text: `add()` token ids as they are accepted, `flush()` once at the end.

    The concatenation of all `add().text` and `flush()` equals `decode_whole(tokenizer, all_ids,
    prompt_token_ids=..., stop=...)`. Special tokens are skipped. After a stop string matched,
    further `add()` calls return nothing and `flush()` returns ''.
    """

    def __init__(self, tokenizer: Any, *, prompt_token_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        context = _context_ids(tokenizer, prompt_token_ids)
        self._window = _DecodeWindow(tokenizer, context, read=len(context), emitted=len(_decode(tokenizer, context)))
        self._filter = _StopFilter(self.stop)
        self._emitted: list[str] = []
        self._stopped = False
        self._flushed = False

    @property
    def stopped(self) -> bool:
        """True once a stop string matched."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text emitted so far plus what is held back (a stop-string prefix, an incomplete character)."""
        return "".join(self._emitted) + self._filter.pending + self._window.tail

    def add(self, token_ids: Sequence[int]) -> DetokenizedDelta:
        """Feed newly generated ids (one or many); return the text that became final."""
        if self._flushed:
            raise RuntimeError("add() after flush(): the generation has already ended")
        if self._stopped or not token_ids:
            return DetokenizedDelta("", self._stopped, 0)
        before = self._window.snapshot(), self._filter.pending
        text, stopped = self._filter.push(self._window.push(token_ids))
        if not stopped or len(token_ids) == 1:
            return self._record(DetokenizedDelta(text, stopped, len(token_ids)))
        # Rare path: replay one id at a time to find the id that completed the stop string, so the
        # engine can drop the ids after it. Stable text only grows, so the replay reaches the same cut.
        self._window, self._filter.pending = before
        pieces: list[str] = []
        for kept, token_id in enumerate(token_ids, start=1):
            piece, stopped = self._filter.push(self._window.push([token_id]))
            pieces.append(piece)
            if stopped:
                break
        return self._record(DetokenizedDelta("".join(pieces), stopped, kept))

    def flush(self) -> str:
        """End of generation: return everything held back, as decode renders it ('\\ufffd' for a broken tail)."""
        if self._flushed or self._stopped:
            self._flushed = True
            return ""
        self._flushed = True
        rest = self._filter.pending + self._window.tail
        self._filter.pending, self._window.tail = "", ""
        cut = find_stop(rest, self.stop)
        if cut >= 0:
            rest, self._stopped = rest[:cut], True
        self._emitted.append(rest)
        return rest

    def _record(self, delta: DetokenizedDelta) -> DetokenizedDelta:
        self._emitted.append(delta.text)
        self._stopped = delta.stopped
        return delta
