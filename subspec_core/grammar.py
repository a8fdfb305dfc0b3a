"""Structured outputs: a request's grammar, and the token masks it puts on drafting and verification.

A `Constraint` is llguidance's serialized grammar (compiled from a JSON schema, a regex, a list of choices or a
Lark/GBNF grammar). llguidance was chosen by measurement on our trees (`python -m benchmarks.grammar_libs`):
it compiles schemas in ~1-2 ms, forks a state in ~1 us, installs as one 8 MB wheel with no dependencies and
imports without torch, so the API process can compile a request's grammar and answer an invalid one with a
400 before it is queued; xgrammar's masks are 2-4x faster per node but it pulls torch (and ~1 GB of triton
on a CPU install).

The masks follow the tree's numbering. The request's matcher has consumed every token emitted so far, the
last one included: that token is the tree's root (its KV is not in the cache yet, but it is in the output).

    root (state S: every emitted token)       row 0 of the verify logits, and the root's children: masked by S
      ├─ node 1 (token a)                      row 1 and node 1's children: S + a
      │    └─ node 3 (token c)                 row 3: S + a + c
      └─ node 2 (token b)                      row 2: S + b

Drafting grows the tree level by level, so each level's nodes get their state by forking their parent's
(`TreeGrammar`), and a node's mask is computed once, when it joins the tree: its children are drafted under
it, and its row of the verify logits is masked by it. Verification then chooses among allowed tokens only, so
what it accepts is exactly what the constrained target would emit, greedy or sampled. This module is torch-
free: masks are numpy int32 bitmasks (bit t of word t // 32 allows token t), turned into tensors by the engine.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# Work per grammar operation is bounded, so a pathological schema or grammar is an error, not a stalled
# process (llguidance's "fuel"; these are its defaults, a fifth of the lexer states).
_MAX_LEXER_STATES = 50_000
# JSON may be pretty-printed, but each gap between tokens holds at most 16 whitespace characters: a small model
# under an unbounded pattern can spend its whole budget on whitespace inside an unfinished object.
_COMPILED = 128
_JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,16}"}


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: llguidance's grammar, and the request field that asked for it."""

    grammar: str
    origin: str  # e.g. "response_format.json_schema.schema", named in errors


class GrammarError(ValueError):
    """A constraint that cannot be compiled: `origin` names the field, the message says why."""

    def __init__(self, origin: str, reason: str) -> None:
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason


def _llguidance() -> Any:
    import llguidance

    return llguidance


def json_schema_constraint(schema: dict[str, Any] | bool, origin: str) -> Constraint:
    """Output that is a JSON value matching `schema` (whitespace between tokens allowed, as models write it)."""
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(origin, "a JSON schema must be an object")
    try:
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(origin, str(exc)) from None
    return Constraint(grammar, origin)


def regex_constraint(pattern: str, origin: str) -> Constraint:
    return Constraint(_llguidance().LLMatcher.grammar_from_regex(pattern), origin)


def choice_constraint(choices: Sequence[str], origin: str) -> Constraint:
    """Output that is exactly one of `choices`."""
    if not choices or not all(isinstance(choice, str) and choice for choice in choices):
        raise GrammarError(origin, "choices must be a non-empty list of non-empty strings")
    alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in dict.fromkeys(choices))
    return lark_constraint(f"start: {alternatives}", origin)


def lark_constraint(grammar: str, origin: str) -> Constraint:
    """A Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema), or a GBNF grammar (llama.cpp's
    `root ::= ...`), converted."""
    llguidance = _llguidance()
    if "::=" in grammar:
        try:
            grammar = llguidance.gbnf_to_lark(grammar)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the grammar's
            raise GrammarError(origin, f"not a valid GBNF grammar: {exc}") from None
    return Constraint(llguidance.LLMatcher.grammar_from_lark(grammar), origin)


def check(constraint: Constraint) -> None:
    """Raise GrammarError when `constraint` does not compile (without a tokenizer: the API process checks a
    request's grammar before queueing it; the worker compiles it for the model's tokenizer)."""
    error = _check_text(constraint.grammar)
    if error:
        raise GrammarError(constraint.origin, error)


@functools.lru_cache(maxsize=512)
def _check_text(grammar: str) -> str:
    llguidance = _llguidance()
    limits = llguidance.LLParserLimits(max_lexer_states=_MAX_LEXER_STATES)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None, limits=limits)
    return messages[0] if is_error else ""


class Grammars:
    """Compiles constraints for one tokenizer (the worker's). A grammar is compiled once (the most recent
    `_COMPILED` are kept); each request gets a copy of its compiled start state (~1 us instead of ~1 ms)."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int] | None = None) -> None:
        llguidance = _llguidance()
        import llguidance.hf

        self.vocab_size = len(tokenizer)
        eos = list(eos_token_ids) if eos_token_ids else None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        self._limits = llguidance.LLParserLimits(max_lexer_states=_MAX_LEXER_STATES)
        self._compiled: dict[str, Any] = {}  # grammar text -> its compiled start state, least recently used first

    @property
    def words(self) -> int:
        """int32 words of one token bitmask."""
        return (self.vocab_size + 31) // 32

    def state(self, constraint: Constraint) -> GrammarState:
        """A fresh matcher for one request's output."""
        start = self._compiled.pop(constraint.grammar, None)
        if start is None:
            start = _llguidance().LLMatcher(self._tokenizer, constraint.grammar, limits=self._limits, log_level=0)
            if start.is_error():
                raise GrammarError(constraint.origin, start.get_error())
        self._compiled[constraint.grammar] = start  # the most recently used last
        while len(self._compiled) > _COMPILED:
            self._compiled.pop(next(iter(self._compiled)))
        return GrammarState(start.deep_copy(), self.words)


class GrammarState:
    """One request's grammar state: every token emitted so far consumed."""

    def __init__(self, matcher: Any, words: int) -> None:
        self._matcher = matcher
        self.words = words

    def allowed(self) -> np.ndarray:
        """(words,) int32 bitmask of the tokens allowed next."""
        return _mask_of(self._matcher, self.words)

    def consume(self, tokens: Sequence[int]) -> None:
        """Advance past emitted tokens. Each was chosen under the masks, so the grammar takes them all up to its
        end; what follows its end (only an end token is allowed there, so only `ignore_eos` gets past it) is
        left unconstrained."""
        if tokens and not self._matcher.is_stopped():
            self._matcher.try_consume_tokens([int(token) for token in tokens])

    @property
    def finished(self) -> bool:
        """Nothing but an end token can follow."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a whole sentence of the grammar (it may end here)."""
        return self._matcher.is_accepting()

    def tree(self) -> TreeGrammar:
        """Masks for a tree rooted at the last emitted token (already consumed)."""
        return TreeGrammar(self._matcher, self.words)


class TreeGrammar:
    """The states of a draft tree's nodes, added level by level (node 0 is the root, in the request's state).

    `add(parents, tokens)` adds one level and returns its nodes' masks; `masks(nodes)` gives the masks of any
    nodes added so far (a verify row i is masked by node i's)."""

    def __init__(self, matcher: Any, words: int) -> None:
        self.words = words
        self._states = [matcher.deep_copy()]
        self._masks = [_mask_of(self._states[0], words)]

    def __len__(self) -> int:
        return len(self._states)

    def add(self, parents: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Add nodes (one level: `parents` index nodes already added) and return their (k, words) masks. A token
        its parent's state refuses (the draft chose it without a mask) gets an all-zero mask: its subtree can
        never be accepted."""
        masks = np.zeros((len(tokens), self.words), dtype=np.int32)
        for k, (parent, token) in enumerate(zip(parents, tokens)):
            state = self._states[parent].deep_copy()
            if not _allows(self._masks[parent], int(token)):
                pass  # refused: the all-zero mask
            elif state.is_stopped():
                masks[k] = self._masks[parent]  # past the grammar's end only an end token, as GrammarState.allowed
            elif state.try_consume_tokens([int(token)]) == 1:
                masks[k] = _mask_of(state, self.words)
            self._states.append(state)
            self._masks.append(masks[k])
        return masks

    def masks(self, nodes: Sequence[int] | None = None) -> np.ndarray:
        """(n, words) masks of `nodes` (all added nodes by default)."""
        chosen = range(len(self._masks)) if nodes is None else nodes
        return np.stack([self._masks[int(node)] for node in chosen])


def _mask_of(matcher: Any, words: int) -> np.ndarray:
    mask = np.zeros(words, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    return mask


def _allows(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)
