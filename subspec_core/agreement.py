"""Checking that speculative output is the target's own, honestly in low precision.

In float32 the check is exact token equality with plain decoding. In bfloat16 it cannot be: a verify forward
(many rows, masked attention) and a one-token step round differently, so where the target's two best logits
are within a few bf16 steps of each other a correct engine may take either branch. The tie-aware check
therefore finds the FIRST position where the two generations differ, asks the target (one scoring prefill
over the prompt and the common prefix) for its top-2 logit margin there, and accepts the divergence only if
that margin is within the tolerance: a near-tie. A wrong verifier diverges where the target was sure, and fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

# A near-tie: the top-2 margin is at most this many bf16 steps (ulps) at the top logit's magnitude.
BF16_TIE_ULPS = 8


def bf16_tie_tolerance(top_logit: float, ulps: int = BF16_TIE_ULPS) -> float:
    """`ulps` bfloat16 steps (8 significant bits) at the magnitude of `top_logit`."""
    exponent = math.floor(math.log2(abs(top_logit))) if top_logit else -126
    return ulps * 2.0 ** (exponent - 7)


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
    margin: float | None = None  # the target's top-2 logit margin at that position
    tolerance: float | None = None  # what counted as a near-tie there
    ok: bool = True  # identical, or diverged at a near-tie

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_generations(engine: Any, prompt: Sequence[int], reference: Sequence[int], candidate: Sequence[int],
                        *, exact: bool) -> Agreement:
    """Compare `candidate` (speculative) with `reference` (plain decoding) for `prompt` (token ids).

    exact (float32): any difference fails. Otherwise the first difference passes only at a bf16 near-tie of
    the target, measured with `engine.prompt_logits` (any engine over the same target weights).
    """
    index = first_divergence(reference, candidate)
    if index is None:
        return Agreement(identical=True)
    if exact:
        return Agreement(identical=False, diverged_at=index, ok=False)
    # where one list ended early, it ended with an end-of-sequence token the other did not choose: same check
    logits = engine.prompt_logits(list(prompt) + list(reference[:index]))[-1]
    top = torch.topk(logits.float(), 2).values.tolist()
    margin, tolerance = top[0] - top[1], bf16_tie_tolerance(top[0])
    return Agreement(identical=False, diverged_at=index, margin=margin, tolerance=tolerance, ok=margin <= tolerance)
