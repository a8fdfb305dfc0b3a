"""Structured outputs under tree speculation: what a constraint costs and what it does to acceptance.

    python -m benchmarks.structured [--max-tokens 96] [--config configs/X.yaml]

For each test schema, the same chat prompt is generated greedily twice with the engine (the default model runs
the offload preset: every layer streamed, substitute draft): once free, once under the schema. Reported per
schema and pooled: tokens/s, tau (tokens per target forward), the host time spent on grammar masks per tree node
(each drafted node's mask is computed once, when it joins the tree) and per iteration, and the schema's compile
time. Constrained and vanilla outputs are compared token for token. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.provenance import device_record, engine_record
from subspec_core.grammar import Grammars, json_schema_constraint
from subspec_core.types import GenerationRequest, SamplingParams

CASES = {
    "person": ('Give me a person as JSON, like {"name": "Ada", "age": 36, "email": "ada@example.org"}.',
               {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                 "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                 "email": {"type": "string", "format": "email", "maxLength": 40}},
                "required": ["name", "age", "email"], "additionalProperties": False}),
    "order": ('Write an order as JSON with an id like ORD-123456, two items (sku, quantity, price) and a status.',
              {"type": "object", "properties": {
                  "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
                  "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
                      "sku": {"type": "string", "maxLength": 12}, "quantity": {"type": "integer", "minimum": 1},
                      "price": {"type": "number", "minimum": 0}}, "required": ["sku", "quantity", "price"],
                      "additionalProperties": False}},
                  "status": {"enum": ["pending", "shipped", "delivered"]}},
               "required": ["id", "items", "status"], "additionalProperties": False}),
    "weather": ("What is the weather in Paris? Answer as JSON with city, temperature in C and a short summary.",
                {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                  "temperature_c": {"type": "number", "minimum": -50, "maximum": 60},
                                                  "summary": {"type": "string", "maxLength": 60}},
                 "required": ["city", "temperature_c", "summary"], "additionalProperties": False}),
}


def _run(engine: Any, prompt: list[int], max_tokens: int, constraint: Any = None) -> dict[str, Any]:
    request = GenerationRequest("structured", tuple(prompt),
                                SamplingParams(max_tokens=max_tokens, temperature=0, constraint=constraint))
    ids: list[int] = []
    stats = None
    started = time.perf_counter()
    for event in engine.generate(request):
        ids += event.token_ids
        stats = event.stats or stats
    seconds = time.perf_counter() - started
    assert stats is not None
    nodes = stats.drafted_tokens + stats.iterations  # every verified node, the roots included
    return {"ids": ids, "tokens": len(ids), "tok_s": len(ids) / seconds, "tau": stats.mean_accept_length,
            "iterations": stats.iterations, "grammar_s": stats.grammar_s,
            "mask_us_per_node": stats.grammar_s / nodes * 1e6 if nodes else 0.0,
            "grammar_ms_per_iteration": stats.grammar_s / stats.iterations * 1e3 if stats.iterations else 0.0}


def measure(engine: Any, vanilla: Any | None, *, max_tokens: int) -> dict[str, Any]:
    tokenizer = engine.tokenizer
    grammars = Grammars(tokenizer, sorted(engine.eos_token_ids))
    rows = []
    for name, (question, schema) in CASES.items():
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = list(tokenizer.encode(text, add_special_tokens=False))
        constraint = json_schema_constraint(schema, name)
        started = time.perf_counter()
        grammars.state(constraint)
        compile_s = time.perf_counter() - started
        free = _run(engine, prompt, max_tokens)
        constrained = _run(engine, prompt, max_tokens, constraint)
        row = {"schema": name, "compile_s": round(compile_s, 4),
               "free": {k: v for k, v in free.items() if k != "ids"},
               "constrained": {k: v for k, v in constrained.items() if k != "ids"},
               "text": tokenizer.decode(constrained["ids"], skip_special_tokens=True)}
        if vanilla is not None:
            row["identical_to_vanilla"] = _run(vanilla, prompt, max_tokens, constraint)["ids"] == constrained["ids"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    def mean(side: str, key: str) -> float:
        return round(statistics.mean(r[side][key] for r in rows), 4)

    return {
        "environment": {**device_record(engine.device), **engine_record(engine)},
        "model": engine.model_name, "mode": engine.config.mode,
        "tok_s": {"free": mean("free", "tok_s"), "constrained": mean("constrained", "tok_s")},
        "tau": {"free": mean("free", "tau"), "constrained": mean("constrained", "tau")},
        "mask_us_per_node": mean("constrained", "mask_us_per_node"),
        "grammar_ms_per_iteration": mean("constrained", "grammar_ms_per_iteration"),
        "compile_s": {r["schema"]: r["compile_s"] for r in rows},
        "identical_to_vanilla": all(r.get("identical_to_vanilla", True) for r in rows),
        "per_schema": rows,
    }


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    from server.engine_args import OFFLOAD_PRESET, add_engine_arguments, engine_config_from_args
    from subspec_core.build import build_engine

    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--no-vanilla", action="store_true", help="skip the vanilla comparison")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    config = engine_config_from_args(args, default_preset=OFFLOAD_PRESET)
    engine = build_engine(config, progress=False)
    vanilla = None if args.no_vanilla else build_engine(dataclasses.replace(config, mode="vanilla"), progress=False)
    result = measure(engine, vanilla, max_tokens=args.max_tokens)
    print(json.dumps(result))
    return 0 if result["identical_to_vanilla"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
