"""Acceptance of the default model's substitute draft on MT-Bench (behaviour, not speed)."""

from __future__ import annotations

from benchmarks.acceptance import measure_acceptance
from benchmarks.mt_bench import first_turn_prompts, load_questions


def test_mt_bench_is_vendored_whole() -> None:
    questions = load_questions()
    assert len(questions) == 80 and {q["category"] for q in questions} >= {"writing", "math", "coding"}


def test_default_model_acceptance_on_first_10_mt_bench_questions(default_engines, default_tokenizer, capsys) -> None:
    """Greedy, 128 new tokens, the default preset (depth 32, topk 6, NF4): prints the mean acceptance length,
    and checks every output against plain (vanilla) decoding of the same streamed target."""
    prompts = first_turn_prompts(default_tokenizer, limit=10)
    report = measure_acceptance(default_engines("subspec"), prompts, max_tokens=128, reference=default_engines("vanilla"))
    with capsys.disabled():
        for entry in report.per_prompt:
            print(f"\nMT-Bench q{entry['prompt']}: {entry}")
        print(f"\nMT-Bench first 10, greedy, 128 tokens: mean acceptance length = {report.mean_accept_length:.2f}")
    assert all(entry["identical_to_vanilla"] for entry in report.per_prompt)
    assert report.mean_accept_length > 3.0  # far above 1 (plain decoding); the figure itself goes in the notes
