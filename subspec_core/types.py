"""The engine's public data types, what a request asks for and what generation emits: plain, picklable
dataclasses that the server sends between processes unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from subspec_core.grammar import Constraint

FINISH_STOP = "stop"  # EOS token or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context limit

MAX_LOGPROBS = 20  # most alternatives per position a request may ask for (OpenAI's chat limit)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. temperature == 0 means greedy (argmax of the target's logits)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None  # None: EngineConfig.seed when the operator set one, else a fresh random seed
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Log-probabilities under the target: None is off (and costs nothing); n reports each token's logprob
    # and its n most likely alternatives. `prompt_logprobs` does the same for prompt tokens 1.. (from the
    # prefill), which with max_tokens == 0 scores a prompt without generating.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Structured output: the grammar every generated token must follow (None: free text). Drafting and
    # verification both mask by it, so the output is the constrained target's, greedy or sampled.
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0 (0 only scores the prompt)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompt token ids (already templated/tokenized) and how to decode."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    correlation_id: str | None = None  # the caller's id for it (the server's X-Request-Id), quoted in log lines


@dataclass
class RequestStats:
    """Per-request counters. mean_accept_length = tokens emitted per target forward (bonus included)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of those, rows kept from the previous request (prefix reuse), not prefilled
    completion_tokens: int = 0
    iterations: int = 0  # target forwards after prefill (one per verify, or per token in vanilla)
    chained_iterations: int = 0  # of those, verifies of a tree post-speculation drafted during the previous one
    drafted_tokens: int = 0  # tree nodes proposed by the draft and verified by the target (root excluded)
    accepted_tokens: int = 0  # drafted tokens the target accepted (bonus tokens excluded)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    grammar_s: float = 0.0  # host time computing a structured output's masks (0 without a constraint)
    h2d_bytes: int = 0  # weight bytes streamed host-to-device for this request
    verify_h2d_bytes: int = 0  # of those, the copies issued while a verify forward ran (not prefetched before it)

    @property
    def mean_accept_length(self) -> float:
        """Tokens emitted per target forward after prefill (accepted + bonus), the paper's tau."""
        if self.iterations == 0:
            return 0.0
        return (self.accepted_tokens + self.iterations) / self.iterations

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "iterations": self.iterations,
            "chained_iterations": self.chained_iterations,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accept_length": round(self.mean_accept_length, 4),
            "prefill_s": round(self.prefill_s, 6),
            "draft_s": round(self.draft_s, 6),
            "verify_s": round(self.verify_s, 6),
            "grammar_s": round(self.grammar_s, 6),
            "h2d_bytes": self.h2d_bytes,
            "verify_h2d_bytes": self.verify_h2d_bytes,
        }


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability at its position under the target, and the most likely tokens there.

    Values are log_softmax of the target's raw logits (before temperature, top-k and top-p), as OpenAI
    and vLLM report them; `top` holds (token id, logprob) pairs, most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """What one engine step emits: new tokens and their text; the last event also why it finished, and `stats`.

    `text` is the newly final text: held-back pieces (an incomplete UTF-8 sequence, a possible stop-string
    prefix) arrive in a later event.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    accept_length: int | None = None  # tokens this target forward produced (None for the prefill's token)
    drafted_tokens: int = 0
    finish_reason: str | None = None
    stats: RequestStats | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token_ids entry, when requested
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # first event only: prompt tokens 1..n-1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
