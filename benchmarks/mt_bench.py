"""The MT-Bench prompt suite (80 questions, FastChat, Apache-2.0): the SubSpec paper's main benchmark.

The paper uses the first turn of each question, formatted with the model's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MT_BENCH_PATH = Path(__file__).resolve().parent / "data" / "mt_bench.jsonl"


def load_questions(path: Path = MT_BENCH_PATH) -> list[dict[str, Any]]:
    """All questions: dicts with question_id, category and turns."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def first_turn_prompts(tokenizer: Any, *, limit: int | None = None, path: Path = MT_BENCH_PATH) -> list[list[int]]:
    """Prompt token ids of the first turn of the first `limit` questions, chat-templated."""
    prompts = []
    for question in load_questions(path)[:limit]:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question["turns"][0]}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(list(tokenizer.encode(rendered, add_special_tokens=False)))
    return prompts
