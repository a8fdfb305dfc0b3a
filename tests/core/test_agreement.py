"""The tie-aware losslessness check (subspec_core/agreement.py), and that it catches a wrong verifier.

In bfloat16 a correct engine may take the other branch of a near-tie; a verifier that accepts a token
the target did not choose diverges where the target was sure. The check must tell the two apart.
"""

from __future__ import annotations

import pytest
import torch

import subspec_core.engine as engine_module
from subspec_core.agreement import bf16_tie_tolerance, compare_generations, first_divergence
from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.loading import load_tokenizer
from subspec_core.verify import accepted_path
from tests.core.tiny import TINY_VOCAB, generate_ids, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # one generation ended (end of sequence) where the other did not
    assert first_divergence([], []) is None


def test_bf16_tie_tolerance_is_a_few_steps_at_the_logits_magnitude() -> None:
    assert bf16_tie_tolerance(20.0) == 8 * 2.0**-3  # 20 is in [16, 32): a bf16 step there is 2**-3
    assert bf16_tie_tolerance(-20.0) == bf16_tie_tolerance(20.0)
    assert bf16_tie_tolerance(1.5, ulps=1) == 2.0**-7


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
