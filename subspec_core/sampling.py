"""Choosing the target's token at each position: greedy, or sampling keyed by (seed, position).

Sampling uses the Gumbel-max trick with noise that depends only on the request seed and the absolute
position of the token being chosen. Two consequences:
- exact: argmax(processed logits + Gumbel noise) is a draw from softmax(processed logits);
- speculation-invariant: a tree node and a plain decoding step that pick the token at the same position
  from the same distribution use the same noise, so with a seed, speculative output equals plain output.
The draft never influences the noise, so every emitted token follows the target's distribution.
"""

from __future__ import annotations

from typing import Sequence

import torch

from subspec_core.types import SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for (request seed, token position) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def gumbel_noise(*, seed: int, positions: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise (len(positions), vocab), one reproducible row per absolute position, made in place
    (one (positions, V) array: the planner counts no more)."""
    noise = torch.empty(len(positions), vocab_size, device=device)
    generator = torch.Generator(device=device)
    for row, position in zip(noise, positions):
        generator.manual_seed(position_seed(seed, position))
        torch.rand(vocab_size, generator=generator, device=device, out=row)
    return noise.log_().neg_().log_().neg_()  # -log(-log(u)); u = 0 gives -inf: never chosen, no NaN


# Top-p sorts each row's whole vocabulary: its workspace (sorted values, int64 order, probabilities, their
# running sum, the mask) is about 25 bytes per logit. Over a 193-node verify of a 152k vocabulary that would
# be ~0.7 GB the memory plan cannot afford, so rows are sorted a few at a time: a fixed number of chunks for a
# fixed row count (no host sync), the same result per row (each row's nucleus depends on that row alone).
# `choose_tokens` samples the same number of rows at a time, for the same reason: temperature, top-k and the
# noise each copy the rows they process.
TOP_P_ROWS = 16
TOP_P_BYTES_PER_LOGIT = 4 + 8 + 4 + 4 + 4 + 1


# Prompt logprobs need the logits of every prompt row: a prefill chunk's hidden states are scored this many rows
# at a time, so a large chunk (the planner grows it into spare memory) does not also need (chunk, V) logits.
PROMPT_SCORE_ROWS = 128


def top_p_workspace_bytes(vocab_size: int) -> int:
    """Peak extra memory of `process_logits`' top-p over any number of rows (what the planner reserves)."""
    return TOP_P_ROWS * vocab_size * TOP_P_BYTES_PER_LOGIT


def sampling_peak_bytes(*, rows: int, positions: int, vocab_size: int) -> int:
    """Peak memory `choose_tokens` (sampling, with top-k and top-p) and then `token_logprobs` take beyond the
    float32 logits (rows, V) they read, over `rows` rows at `positions` distinct positions (what the planner
    reserves). In float32 rows of V: the noise (positions rows) stays while each chunk of at most TOP_P_ROWS
    rows is processed: temperature and top-k copy it (two copies alive), top-p adds its mask and workspace, and
    the sum holds the processed chunk, its gathered noise and the result (3 x chunk). Logprobs of the emitted
    rows (<= positions): a copy and its log-softmax. Greedy decoding takes none of it."""
    per_row = vocab_size * 4
    chunk = min(rows, TOP_P_ROWS)
    choose = (positions + 3 * chunk) * per_row + top_p_workspace_bytes(vocab_size)
    logprobs = 2 * min(rows, positions) * per_row
    return max(choose, logprobs)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on float32 logits (n, V); removed tokens get -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        drop = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
        for start in range(0, logits.shape[0], TOP_P_ROWS):
            rows = slice(start, start + TOP_P_ROWS)
            sorted_logits, order = torch.sort(logits[rows], dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
            drop[rows].scatter_(-1, order, (probs.cumsum(-1) - probs) >= params.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    *, logits: torch.Tensor, params: SamplingParams, seed: int, positions: torch.Tensor, first_position: int, num_positions: int
) -> torch.Tensor:
    """The target's token (n,) for each row of logits (n, V); row r picks the token at `positions[r]`.

    Positions lie in [first_position, first_position + num_positions); the noise for those is drawn once.
    Sampled rows are processed TOP_P_ROWS at a time (the same token per row: rows are independent).
    """
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    noise = gumbel_noise(
        seed=seed, positions=range(first_position, first_position + num_positions), vocab_size=logits.shape[-1], device=logits.device
    )
    offsets = positions - first_position  # (n,) row of each logits row's noise
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for start in range(0, logits.shape[0], TOP_P_ROWS):
        rows = slice(start, start + TOP_P_ROWS)
        tokens[rows] = torch.argmax(process_logits(logits[rows], params) + noise[offsets[rows]], dim=-1)
    return tokens


def token_logprobs(*, logits: torch.Tensor, tokens: torch.Tensor, num_top: int) -> tuple[TokenLogprob, ...]:
    """Each row's chosen token's log-probability and its `num_top` most likely tokens.

    logits (n, V) are the target's raw logits at the positions that chose `tokens` (n,): the values are
    log_softmax of those logits in float32 (before temperature, top-k, top-p), which is what OpenAI and vLLM
    report whatever the sampling settings. One host transfer for all rows.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = logprobs.gather(-1, tokens[:, None].long()).squeeze(-1)  # (n,)
    k = min(num_top, logprobs.shape[-1])
    if k:
        top_values, top_ids = torch.topk(logprobs, k, dim=-1)  # (n, k), most likely first
        top_rows = zip(top_ids.tolist(), top_values.tolist())
    else:
        top_rows = (((), ()) for _ in range(tokens.shape[0]))
    return tuple(
        TokenLogprob(token_id=token, logprob=value, top=tuple(zip(ids, values)))
        for token, value, (ids, values) in zip(tokens.tolist(), chosen.tolist(), top_rows)
    )
