"""Checking that speculative output is the target's own, honestly at the precision it runs in.

A verify forward (many rows, masked attention) and a one-token step round differently: in bfloat16 by a few
bf16 steps, in float32 too, by about 2e-5 on logits of magnitude 10 (measured on the tiny test models: the last
row of a 40-token prefill against the same row computed alone). Where the target's decision is that close to a
tie, a correct engine may take either branch. The tie-aware check therefore finds the FIRST position where the
two generations differ, asks the target (one scoring prefill over the prompt and the common prefix) how far its
decision there was from flipping, and accepts the divergence only within the tolerance of the dtype: a
near-tie. A wrong verifier diverges where the target was sure, and fails.

How far from flipping, as a logit gap (an error of d in the logits moves a gap by at most 2 d):
- greedy: the top-2 logit margin;
- sampled (Gumbel-max keyed by seed and position, sampling.py): the gap between the two tokens' perturbed
  scores times the temperature, or how close either token's place was to the top-p cut: the probability mass
  before it against top_p, times the temperature (the same error d moves that mass by at most 2 d / temperature).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch

from subspec_core.sampling import gumbel_noise, process_logits
from subspec_core.types import SamplingParams

# A near-tie: the decision margin is at most this many steps (ulps) of the dtype at the top logit's magnitude.
BF16_TIE_ULPS = 8
FP32_TIE_ULPS = 64  # 6e-5 at |logit| 10: three times the measured float32 verify/step rounding difference
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_TIE_ULPS = {torch.bfloat16: BF16_TIE_ULPS, torch.float16: BF16_TIE_ULPS, torch.float32: FP32_TIE_ULPS}


def tie_tolerance(top_logit: float, dtype: torch.dtype, ulps: int | None = None) -> float:
    """`ulps` steps of `dtype` (default: its near-tie width) at the magnitude of `top_logit`."""
    exponent = math.floor(math.log2(abs(top_logit))) if top_logit else -126
    return (_TIE_ULPS[dtype] if ulps is None else ulps) * 2.0 ** (exponent - _MANTISSA_BITS[dtype])


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """The first index where the two token lists differ (one ending before the other counts), or None if equal."""
    for index, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return index
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


@dataclass(frozen=True)
class Agreement:
    """How a generation compares with plain decoding of the same prompt."""

    identical: bool
    diverged_at: int | None = None  # index into the generated tokens
    margin: float | None = None  # how far the target's decision there was from flipping, as a logit gap
    tolerance: float | None = None  # what counted as a near-tie there
    ok: bool = True  # identical, or diverged at a near-tie

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_generations(engine: Any, prompt: Sequence[int], reference: Sequence[int], candidate: Sequence[int],
                        *, exact: bool, dtype: torch.dtype = torch.bfloat16, params: SamplingParams | None = None,
                        seed: int | None = None) -> Agreement:
    """Compare `candidate` (speculative) with `reference` (plain decoding) for `prompt` (token ids).

    exact: any difference fails. Otherwise the first difference passes only at a near-tie of the target's
    decision there (within `tie_tolerance` of `dtype`), measured with `engine.prompt_logits` (any engine over the
    same target weights). `params` and `seed` are the request's sampling (default: greedy); a sampled request
    needs its seed (its noise is keyed by it).
    """
    index = first_divergence(reference, candidate)
    if index is None:
        return Agreement(identical=True)
    if exact:
        return Agreement(identical=False, diverged_at=index, ok=False)
    logits = engine.prompt_logits(list(prompt) + list(reference[:index]))[-1].float()
    chosen = reference[index] if index < len(reference) else None
    other = candidate[index] if index < len(candidate) else None
    if params is None or params.greedy:
        margin = _greedy_margin(logits)
    else:
        if seed is None:
            raise ValueError("a sampled comparison needs the request's seed")
        margin = _sampled_margin(logits, params, seed=seed, position=len(prompt) + index, chosen=chosen, other=other)
    tolerance = tie_tolerance(torch.max(logits).item(), dtype)
    return Agreement(identical=False, diverged_at=index, margin=margin, tolerance=tolerance, ok=margin <= tolerance)


def _greedy_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits, 2).values.tolist()
    return top[0] - top[1]


def sampled_scores(logits: torch.Tensor, params: SamplingParams, *, seed: int, position: int) -> torch.Tensor:
    """The scores (V,) whose argmax is the token sampled at `position` from one row of logits (V,):
    processed logits plus that position's Gumbel noise, as `sampling.choose_tokens` computes them."""
    noise = gumbel_noise(seed=seed, positions=[position], vocab_size=logits.shape[-1], device=logits.device)[0]
    return process_logits(logits[None], params)[0] + noise


def _sampled_margin(logits: torch.Tensor, params: SamplingParams, *, seed: int, position: int, chosen: int | None,
                    other: int | None) -> float:
    """How far (in logit units) the sampled decision at `position` was from choosing differently.

    A generation that ended early ended with an end-of-sequence token the other did not choose, or the other one
    did: a missing token is compared as the best (or second best) competitor.
    """
    scores = sampled_scores(logits, params, seed=seed, position=position)
    best, second = (int(i) for i in torch.topk(scores, 2).indices)
    if chosen is None:
        chosen = best
    if other is None:
        other = second if best == chosen else best
    margins = []
    if params.top_p < 1.0:  # how close either token's place was to the top-p cut
        probs = torch.softmax(process_logits(logits[None], replace(params, top_p=1.0))[0], dim=-1)  # temperature, top-k
        for token in (chosen, other):
            mass_before = probs[probs > probs[token]].sum().item()
            margins.append(abs(mass_before - params.top_p) * params.temperature)
    if math.isfinite(scores[other].item()):  # both kept: the perturbed scores decide
        margins.append(abs(scores[chosen].item() - scores[other].item()) * params.temperature)
    return min(margins, default=math.inf)
