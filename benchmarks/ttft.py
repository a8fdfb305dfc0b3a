"""Time to first token of a chat's second turn: prefilled cold, and with the first turn's KV rows reused.

    python -m benchmarks.ttft [--num-prompts 5] [--max-tokens 64] [--config configs/X.yaml]

For each of the first MT-Bench questions (both of whose turns the suite has): generate the first turn's
answer, then time the second turn's request (the whole conversation, chat-templated) twice through
`Engine.generate`: once right after the first turn (its prompt and answer rows are reused: only the new
tokens are prefilled) and once after forgetting the cache (a cold prefill of the whole conversation).
Both must give the same tokens. Each prefill chunk streams every offloaded weight once, so on a streamed
model a reused prefix saves whole weight passes, not just arithmetic. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.mt_bench import load_questions
from benchmarks.provenance import device_record, engine_record
from subspec_core.types import GenerationRequest, SamplingParams


def _chat(tokenizer: Any, turns: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _first_token(engine: Any, prompt: list[int], max_tokens: int) -> tuple[float, list[int], Any]:
    """Seconds to the first event, the generated ids, the final stats."""
    request = GenerationRequest("ttft", tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))
    started = time.perf_counter()
    events = engine.generate(request)
    first = next(events)
    ttft = time.perf_counter() - started
    ids, stats = list(first.token_ids), first.stats
    for event in events:
        ids += event.token_ids
        stats = event.stats or stats
    return ttft, ids, stats


def measure(engine: Any, *, num_prompts: int, max_tokens: int) -> dict[str, Any]:
    tokenizer = engine.tokenizer
    rows = []
    for question in load_questions()[:num_prompts]:
        turn1 = [{"role": "user", "content": question["turns"][0]}]
        _, answer_ids, _ = _first_token(engine, _chat(tokenizer, turn1), max_tokens)
        turn2 = turn1 + [{"role": "assistant", "content": tokenizer.decode(answer_ids, skip_special_tokens=True)},
                         {"role": "user", "content": question["turns"][1]}]
        prompt = _chat(tokenizer, turn2)
        reused_s, reused_ids, reused_stats = _first_token(engine, prompt, max_tokens)
        engine.kv_cache.token_ids.clear()  # forget every row: the same request, prefilled cold
        cold_s, cold_ids, _ = _first_token(engine, prompt, max_tokens)
        rows.append({"question": question["question_id"], "prompt_tokens": len(prompt),
                     "cached_tokens": reused_stats.cached_prompt_tokens, "ttft_cold_s": cold_s,
                     "ttft_reused_s": reused_s, "identical": cold_ids == reused_ids})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "environment": {**device_record(engine.device), **engine_record(engine)},
        "model": engine.model_name, "mode": engine.config.mode, "prefill_chunk_size": engine.config.prefill_chunk_size,
        "questions": len(rows), "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rows),
        "mean_cached_tokens": statistics.mean(r["cached_tokens"] for r in rows),
        "ttft_cold_s": statistics.mean(r["ttft_cold_s"] for r in rows),
        "ttft_reused_s": statistics.mean(r["ttft_reused_s"] for r in rows),
        "all_identical": all(r["identical"] for r in rows), "per_question": rows,
    }


def main(argv: list[str] | None = None) -> int:
    from server.engine_args import OFFLOAD_PRESET, add_engine_arguments, engine_config_from_args
    from subspec_core.build import build_engine

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ttft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    # the default model without --config runs the offload preset: every prefill chunk streams the weights
    engine = build_engine(engine_config_from_args(args, default_preset=OFFLOAD_PRESET), progress=False)
    result = measure(engine, num_prompts=args.num_prompts, max_tokens=args.max_tokens)
    print(json.dumps(result))
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
