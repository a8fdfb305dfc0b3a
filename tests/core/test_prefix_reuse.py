"""Prefix reuse: a request whose prompt starts like the last request's prompt and output prefills only the rest,
and gets exactly what a cold start gets (fp32: the same tokens; logprobs equal within rounding)."""

from __future__ import annotations

import pytest
import torch

from subspec_core.config import SpeculationConfig
from subspec_core.types import GenerationRequest, SamplingParams
from tests.core.tiny import TINY_VOCAB, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SPEC = SpeculationConfig(topk=3, max_depth=5)


def make(tiny_tokenizer, mode: str = "subspec"):
    return tiny_engine(tiny_hf_model("qwen2", seed=11), tiny_tokenizer, mode=mode, speculation=SPEC, prefill_chunk_size=8)


class CountingRows:
    """Counts the prompt rows the target's prefill forwards process (wraps Engine._prefill_chunks)."""

    def __init__(self, engine) -> None:
        self.rows = 0
        inner = engine._prefill_chunks

        def counted(*args, **kwargs):
            for hidden in inner(*args, **kwargs):
                self.rows += hidden.shape[0]
                yield hidden

        engine._prefill_chunks = counted


def run(engine, prompt: list[int], **sampling) -> tuple[list[int], list[float], object]:
    request = GenerationRequest("r", tuple(prompt), SamplingParams(**{"max_tokens": 20, "temperature": 0, "logprobs": 0,
                                                                       **sampling}))
    ids, logprobs, stats = [], [], None
    for event in engine.generate(request):
        ids += event.token_ids
        logprobs += [entry.logprob for entry in event.logprobs or ()]
        stats = event.stats or stats
    return ids, logprobs, stats


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mode", ["subspec", "vanilla"])
def test_next_turn_reuses_prompt_and_output_rows_and_equals_a_cold_start(tiny_tokenizer, mode) -> None:
    warm, cold = make(tiny_tokenizer, mode), make(tiny_tokenizer, mode)
    first_prompt = prompt_of(21, 1)
    first_ids, _, first_stats = run(warm, first_prompt)
    assert first_stats.cached_prompt_tokens == 0
    # the next turn: the whole conversation so far, then new tokens
    second_prompt = first_prompt + first_ids + prompt_of(7, 2)
    rows = CountingRows(warm)
    got, got_logprobs, stats = run(warm, second_prompt)
    expected, expected_logprobs, _ = run(cold, second_prompt)
    assert got == expected
    torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(expected_logprobs), atol=1e-4, rtol=1e-4)
    # every row the first request committed is kept: its prompt and all its tokens but the last (never forwarded)
    kept = len(first_prompt) + len(first_ids) - 1
    assert stats.cached_prompt_tokens == kept
    assert rows.rows == len(second_prompt) - kept


def test_a_retried_prompt_prefills_one_token_and_gives_the_same_output(tiny_tokenizer) -> None:
    engine = make(tiny_tokenizer)
    prompt = prompt_of(30, 3)
    first = run(engine, prompt, temperature=0.9, seed=5)
    rows = CountingRows(engine)
    again = run(engine, prompt, temperature=0.9, seed=5)
    assert again[0] == first[0]
    assert again[2].cached_prompt_tokens == len(prompt) - 1 and rows.rows == 1


def test_a_different_prompt_keeps_only_the_common_prefix(tiny_tokenizer) -> None:
    engine, cold = make(tiny_tokenizer), make(tiny_tokenizer)
    run(engine, prompt_of(25, 4))
    other = prompt_of(25, 4)[:10] + prompt_of(15, 5)
    got = run(engine, other)
    assert got[2].cached_prompt_tokens == 10
    assert got[0] == run(cold, other)[0]


def test_prompt_logprobs_score_every_row_so_nothing_is_reused(tiny_tokenizer) -> None:
    engine = make(tiny_tokenizer)
    prompt = prompt_of(20, 6)
    run(engine, prompt)
    request = GenerationRequest("s", tuple(prompt), SamplingParams(max_tokens=0, prompt_logprobs=0))
    final = list(engine.generate(request))[-1]
    assert final.stats.cached_prompt_tokens == 0 and len(final.prompt_logprobs) == len(prompt) - 1


def test_an_interrupted_request_leaves_only_finished_rows_reusable(tiny_tokenizer) -> None:
    engine, cold = make(tiny_tokenizer), make(tiny_tokenizer)
    prompt = prompt_of(40, 7)  # five prefill chunks of 8
    checks = iter(range(10_000))
    # cancel before the 3rd chunk's 2nd layer: chunks 1 and 2 are complete, chunk 3 half written
    list(engine.generate(GenerationRequest("x", tuple(prompt), SamplingParams(max_tokens=5, temperature=0)),
                         cancelled=lambda: next(checks) >= 2 * 3 + 1))
    assert engine.kv_cache.token_ids == prompt[:16]
    got = run(engine, prompt)
    assert got[2].cached_prompt_tokens == 16
    assert got[0] == run(cold, prompt)[0]
    # and a request aborted between steps keeps what its finished steps committed
    events = engine.generate(GenerationRequest("y", tuple(prompt), SamplingParams(max_tokens=20, temperature=0)))
    produced = list(next(events).token_ids) + list(next(events).token_ids)
    events.close()
    assert engine.kv_cache.token_ids == prompt + produced[:-1]
