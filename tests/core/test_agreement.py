"""The tie-aware losslessness check (subspec_core/agreement.py), and that it catches a wrong verifier.

In bfloat16 a correct engine may take the other branch of a near-tie; a verifier that accepts a token
the target did not choose diverges where the target was sure. The check must tell the two apart.
"""

from __future__ import annotations

import pytest
import torch

import subspec_core.engine as engine_module
from subspec_core.agreement import compare_generations, first_divergence, sampled_scores, tie_tolerance
from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.loading import load_tokenizer
from subspec_core.types import SamplingParams
from subspec_core.verify import accepted_path
from tests.core.tiny import TINY_VOCAB, generate_ids, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # one generation ended (end of sequence) where the other did not
    assert first_divergence([], []) is None


def test_bf16_tie_tolerance_is_a_few_steps_at_the_logits_magnitude() -> None:
    assert tie_tolerance(20.0, torch.bfloat16) == 8 * 2.0**-3  # 20 is in [16, 32): a bf16 step there is 2**-3
    assert tie_tolerance(-20.0, torch.bfloat16) == tie_tolerance(20.0, torch.bfloat16)
    assert tie_tolerance(1.5, torch.bfloat16, ulps=1) == 2.0**-7
    assert tie_tolerance(10.0, torch.float32) == 64 * 2.0**-20  # 10 is in [8, 16): a float32 step there is 2**-20


class _FixedLogits:
    """A stand-in target that scores every sequence with the same logits (for the decision-margin arithmetic)."""

    def __init__(self, logits: list[float]) -> None:
        self.logits = torch.tensor(logits)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.logits.expand(len(token_ids), -1)


def test_fp32_near_ties_pass_and_clear_decisions_fail() -> None:
    # greedy: a 1e-5 gap at magnitude 10 is float32 rounding (tolerance 6e-5); 0.01 is the target being sure
    tie = compare_generations(_FixedLogits([10.0, 10.0 - 1e-5, 0.0]), [0], [0], [1], exact=False, dtype=torch.float32)
    assert tie.ok and tie.margin == pytest.approx(1e-5, rel=0.1)
    sure = compare_generations(_FixedLogits([10.0, 9.99, 0.0]), [0], [0], [1], exact=False, dtype=torch.float32)
    assert not sure.ok
    # sampled: token 1 sits at the top-p cut (the mass before it is 0.5 = top_p, up to rounding), so whether it is
    # in the nucleus is a near-tie: choosing token 0 instead is not a loss; swapping two tokens far from any cut is
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).tolist()
    params = SamplingParams(temperature=1.0, top_p=0.5)
    at_cut = compare_generations(_FixedLogits(logits), [0], [1], [0], exact=False, dtype=torch.float32, params=params, seed=1)
    assert at_cut.ok and at_cut.margin < 1e-6
    params = SamplingParams(temperature=1.0)
    scores = sampled_scores(torch.tensor(logits), params, seed=1, position=1)
    chosen, other = int(scores.argmax()), int(scores.argsort()[1])
    far = compare_generations(_FixedLogits(logits), [0], [chosen], [other], exact=False, dtype=torch.float32,
                              params=params, seed=1)
    assert not far.ok and far.margin == pytest.approx(float(scores[chosen] - scores[other]), rel=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


def _prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, TINY_VOCAB, (12,), generator=gen).tolist() for _ in range(count)]


def _accepts_the_drafts_first_choice(**kwargs):
    """A WRONG verifier: it walks as if the target had chosen the draft's best first token at the root."""
    target = kwargs["target_tokens"].clone()
    target[0] = kwargs["tokens"][1]
    return accepted_path(**{**kwargs, "target_tokens": target})


def test_fp32_check_is_exact(tokenizer) -> None:
    vanilla = tiny_engine(tiny_hf_model("llama", seed=4), tokenizer, mode="vanilla")
    prompt = _prompts(1)[0]
    reference, _ = generate_ids(vanilla, prompt, max_tokens=12, temperature=0)
    assert compare_generations(vanilla, prompt, reference, reference, exact=True).ok
    changed = reference[:5] + [(reference[5] + 1) % TINY_VOCAB] + reference[6:]
    result = compare_generations(vanilla, prompt, reference, changed, exact=True)
    assert not result.ok and result.diverged_at == 5


def test_bf16_check_passes_the_engine_and_fails_a_wrong_verifier(tokenizer, monkeypatch) -> None:
    spec = SpeculationConfig(topk=3, max_depth=5)
    hf = lambda: tiny_hf_model("qwen2", seed=5)  # noqa: E731
    vanilla = tiny_engine(hf(), tokenizer, mode="vanilla", dtype=torch.bfloat16)
    subspec = tiny_engine(hf(), tokenizer, speculation=spec, dtype=torch.bfloat16)
    prompts = _prompts(6)
    references = [generate_ids(vanilla, p, max_tokens=24, temperature=0)[0] for p in prompts]

    correct = [compare_generations(vanilla, p, ref, generate_ids(subspec, p, max_tokens=24, temperature=0)[0], exact=False)
               for p, ref in zip(prompts, references)]
    assert all(r.ok for r in correct), [r for r in correct if not r.ok]

    monkeypatch.setattr(engine_module, "accepted_path", _accepts_the_drafts_first_choice)
    wrong = [compare_generations(vanilla, p, ref, generate_ids(subspec, p, max_tokens=24, temperature=0)[0], exact=False)
             for p, ref in zip(prompts, references)]
    losses = [r for r in wrong if not r.ok]
    assert losses, "a verifier that accepts mismatching tokens must be caught"
    assert all(r.margin is not None and r.margin > r.tolerance for r in losses)


def test_sampled_scores_are_the_engines_draws(tokenizer) -> None:
    """The check's sampled decision is the engine's: its scores' argmax at every position is the token drawn."""
    vanilla = tiny_engine(tiny_hf_model("llama", seed=4), tokenizer, mode="vanilla")
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)
    for seed, prompt in enumerate(_prompts(3)):
        drawn, _ = generate_ids(vanilla, prompt, max_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=seed)
        rows = vanilla.prompt_logits(prompt + drawn)[len(prompt) - 1:-1]
        assert [int(sampled_scores(row, params, seed=seed, position=len(prompt) + i).argmax())
                for i, row in enumerate(rows)] == drawn


def test_fp32_sampled_check_passes_the_engine_and_fails_a_wrong_verifier(tokenizer, monkeypatch) -> None:
    spec = SpeculationConfig(topk=3, max_depth=5)
    vanilla = tiny_engine(tiny_hf_model("llama3", seed=5), tokenizer, mode="vanilla")
    subspec = tiny_engine(tiny_hf_model("llama3", seed=5), tokenizer, speculation=spec)
    sampling = {"temperature": 0.8, "top_p": 0.95}
    params, prompts = SamplingParams(**sampling), _prompts(6)

    def check(seed: int, prompt: list[int]):
        reference = generate_ids(vanilla, prompt, max_tokens=24, seed=seed, **sampling)[0]
        got = generate_ids(subspec, prompt, max_tokens=24, seed=seed, **sampling)[0]
        return compare_generations(vanilla, prompt, reference, got, exact=False, dtype=torch.float32, params=params, seed=seed)

    correct = [check(seed, p) for seed, p in enumerate(prompts)]
    assert all(r.identical for r in correct), [r for r in correct if not r.identical]

    monkeypatch.setattr(engine_module, "accepted_path", _accepts_the_drafts_first_choice)
    wrong = [check(seed, p) for seed, p in enumerate(prompts)]
    assert any(not r.identical for r in wrong), "the wrong verifier must change some output"
    assert all(r.identical or not r.ok for r in wrong), "no divergence of a wrong verifier may pass as a near-tie"
