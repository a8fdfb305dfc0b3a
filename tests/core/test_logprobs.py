"""Log-probabilities are exactly the target's: the pure function (subspec_core/sampling.token_logprobs), and
tiny fp32 engines where speculative logprobs equal vanilla logprobs for the same tokens, equal a scoring
pass over prompt + output, and asking for them changes no token."""

from __future__ import annotations

import pytest
import torch

from subspec_core.config import SpeculationConfig
from subspec_core.sampling import token_logprobs
from subspec_core.types import FINISH_LENGTH, FINISH_STOP, GenerationRequest, SamplingParams, TokenEvent
from tests.core.tiny import TINY_VOCAB, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOLERANCE = 1e-4  # fp32: a tree-masked verify forward and a one-token forward differ only by rounding


def test_token_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    tokens = torch.tensor([3, 0, 49, 7])
    entries = token_logprobs(logits=logits, tokens=tokens, num_top=5)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row, entry in enumerate(entries):
        assert entry.token_id == int(tokens[row])
        assert entry.logprob == pytest.approx(float(reference[row, tokens[row]]), abs=1e-5)
        ids = [token for token, _ in entry.top]
        assert ids == torch.argsort(reference[row], descending=True)[:5].tolist()
        assert [value for _, value in entry.top] == pytest.approx(reference[row, ids].tolist(), abs=1e-5)
    assert all(entry.top == () for entry in token_logprobs(logits=logits, tokens=tokens, num_top=0))
    assert len(token_logprobs(logits=logits, tokens=tokens, num_top=500)[0].top) == 50  # capped at the vocab


def run(engine, prompt: list[int], **sampling) -> list[TokenEvent]:
    return list(engine.generate(GenerationRequest("lp", tuple(prompt), SamplingParams(**sampling))))


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [token for event in events for token in event.token_ids]


def logprobs_of(events: list[TokenEvent]):
    for event in events:
        assert event.logprobs is not None and len(event.logprobs) == len(event.token_ids)
    return [entry for event in events for entry in event.logprobs]


def scored(engine, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The reference: log_softmax of the target's logits over prompt + output, at the output positions."""
    logits = engine.prompt_logits(prompt + output)  # (n, V)
    rows = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(output)], dim=-1)
    return rows.gather(-1, torch.tensor(output)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def engines(tiny_tokenizer):
    model = tiny_hf_model("qwen2", seed=3)
    spec = SpeculationConfig(topk=3, max_depth=6)
    return (tiny_engine(model, tiny_tokenizer, speculation=spec), tiny_engine(model, tiny_tokenizer, mode="vanilla"))


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_k": 20, "seed": 11}],
                         ids=["greedy", "sampled"])
def test_speculative_logprobs_equal_vanilla_logprobs_and_leave_tokens_unchanged(engines, sampling):
    subspec, vanilla = engines
    prompt = torch.randint(0, TINY_VOCAB, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    plain = run(subspec, prompt, max_tokens=40, **sampling)
    spec = run(subspec, prompt, max_tokens=40, logprobs=4, **sampling)
    base = run(vanilla, prompt, max_tokens=40, logprobs=4, **sampling)
    assert all(event.logprobs is None for event in plain)  # not asked for: not computed
    assert tokens_of(spec) == tokens_of(plain) == tokens_of(base)
    assert sum(1 for e in spec if e.accept_length and e.accept_length > 1) > 0  # speculation did accept tokens
    spec_lp, base_lp = logprobs_of(spec), logprobs_of(base)
    assert [e.token_id for e in spec_lp] == tokens_of(spec)
    assert torch.allclose(torch.tensor([e.logprob for e in spec_lp]), torch.tensor([e.logprob for e in base_lp]),
                          atol=TOLERANCE, rtol=0)
    for a, b in zip(spec_lp, base_lp):
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(a.top) == 4
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=TOLERANCE)
    # ... and both are the target's own: a scoring pass over prompt + output gives the same numbers
    reference = scored(vanilla, prompt, tokens_of(base))
    assert torch.allclose(torch.tensor([e.logprob for e in spec_lp]), reference, atol=TOLERANCE, rtol=0)
    if sampling["temperature"] == 0:  # greedy picks the most likely token: it heads its own top list
        assert all(e.top[0][0] == e.token_id for e in spec_lp)


def test_logprobs_stay_aligned_when_eos_or_max_tokens_cut_a_step(tiny_tokenizer):
    model = tiny_hf_model("llama", seed=7)
    prompt = list(range(5, 30))
    free = run(tiny_engine(model, tiny_tokenizer, mode="vanilla"), prompt, max_tokens=30, temperature=0)
    eos = tokens_of(free)[17]
    engine = tiny_engine(model, tiny_tokenizer, eos_token_ids=frozenset({eos}))
    stopped = run(engine, prompt, max_tokens=30, temperature=0, logprobs=2)
    assert stopped[-1].finish_reason == FINISH_STOP and eos not in tokens_of(stopped)
    assert [e.token_id for e in logprobs_of(stopped)] == tokens_of(stopped)
    cut = run(engine, prompt, max_tokens=9, temperature=0, logprobs=0)
    assert len(tokens_of(cut)) == 9 and cut[-1].finish_reason == FINISH_LENGTH
    assert [e.token_id for e in logprobs_of(cut)] == tokens_of(cut)


def test_prompt_logprobs_score_the_prompt_in_the_prefill(engines):
    subspec, _ = engines
    prompt = torch.randint(0, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(9)).tolist()  # 3 chunks
    events = run(subspec, prompt, max_tokens=0, prompt_logprobs=3)
    assert len(events) == 1 and events[0].token_ids == () and events[0].finish_reason == FINISH_LENGTH
    entries = events[0].prompt_logprobs
    assert [e.token_id for e in entries] == prompt[1:]
    reference = scored(subspec, prompt[:1], prompt[1:])
    assert torch.allclose(torch.tensor([e.logprob for e in entries]), reference, atol=TOLERANCE, rtol=0)
    assert all(len(e.top) == 3 for e in entries)
    # With generation too, only the first event carries them, and the output is what it is without them.
    both = run(subspec, prompt, max_tokens=5, temperature=0, prompt_logprobs=1, logprobs=1)
    assert [e.logprob for e in both[0].prompt_logprobs] == pytest.approx([e.logprob for e in entries], abs=1e-6)
    assert all(e.prompt_logprobs is None for e in both[1:])
    assert tokens_of(both) == tokens_of(run(subspec, prompt, max_tokens=5, temperature=0))


def test_prompt_logprobs_are_scored_a_bounded_number_of_rows_at_a_time(engines, monkeypatch):
    """A prefill chunk's rows get logits PROMPT_SCORE_ROWS at a time (the planner reserves that much, however large
    the chunk): with 5 rows at a time, scores and top tokens equal those of whole chunks."""
    subspec, _ = engines
    prompt = torch.randint(0, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    whole = run(subspec, prompt, max_tokens=0, prompt_logprobs=2)[0].prompt_logprobs
    monkeypatch.setattr("subspec_core.engine.PROMPT_SCORE_ROWS", 5)
    pieces = run(subspec, prompt, max_tokens=0, prompt_logprobs=2)[0].prompt_logprobs
    assert [e.token_id for e in pieces] == [e.token_id for e in whole] == prompt[1:]
    assert [e.logprob for e in pieces] == pytest.approx([e.logprob for e in whole], abs=1e-6)
    assert [[t for t, _ in e.top] for e in pieces] == [[t for t, _ in e.top] for e in whole]


def test_logprob_settings_are_validated():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
