"""The MT-Bench prompts the acceptance benchmark runs on.

The acceptance length itself is a measurement, not a behaviour: `python -m benchmarks.acceptance` reports it
(its figure is in the README); losslessness on the default model is tested in test_lossless.py.
"""

from __future__ import annotations

from benchmarks.mt_bench import first_turn_prompts, load_questions


def test_mt_bench_is_vendored_whole() -> None:
    questions = load_questions()
    assert len(questions) == 80 and {q["category"] for q in questions} >= {"writing", "math", "coding"}


def test_first_turn_prompts_are_chat_templated(default_tokenizer) -> None:
    prompts = first_turn_prompts(default_tokenizer, limit=3)
    assert len(prompts) == 3 and all(isinstance(t, int) for p in prompts for t in p)
    assert default_tokenizer.decode(prompts[0]).count("<|im_start|>") >= 2  # a templated user + assistant turn
