"""Mean acceptance length (tokens emitted per target forward, the paper's tau) on MT-Bench first turns.

    python -m benchmarks.acceptance --num-prompts 10 --max-tokens 128 [--config configs/default-offload.yaml] [--check-vanilla]

Acceptance depends on the model and draft, not on the hardware, so this runs anywhere (CPU included). It
always runs mode subspec (whatever the config says); without --config the default model gets
configs/default-offload.yaml (every layer streamed, as the paper runs its models).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from benchmarks.mt_bench import first_turn_prompts
from benchmarks.provenance import device_record, engine_record
from subspec_core.types import GenerationRequest, SamplingParams


@dataclass
class AcceptanceReport:
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    iterations: int = 0
    emitted_after_prefill: int = 0  # tokens produced by speculative iterations (accepted + bonus)

    @property
    def mean_accept_length(self) -> float:
        """Pooled over all prompts: tokens emitted by verify forwards / verify forwards."""
        return self.emitted_after_prefill / max(self.iterations, 1)


def run_greedy(engine: Any, prompt: list[int], max_tokens: int) -> tuple[list[int], Any]:
    request = GenerationRequest("acceptance", tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=False))
    ids: list[int] = []
    stats = None
    for event in engine.generate(request):
        ids.extend(event.token_ids)
        stats = event.stats or stats
    return ids, stats


def measure_acceptance(engine: Any, prompts: list[list[int]], *, max_tokens: int, reference: Any = None) -> AcceptanceReport:
    """Greedy generation over `prompts`; with a `reference` engine (vanilla), also checks identical tokens."""
    report = AcceptanceReport()
    for index, prompt in enumerate(prompts):
        ids, stats = run_greedy(engine, prompt, max_tokens)
        entry = {"prompt": index, "tokens": len(ids), "iterations": stats.iterations,
                 "mean_accept_length": round(stats.mean_accept_length, 3)}
        if reference is not None:
            entry["identical_to_vanilla"] = run_greedy(reference, prompt, max_tokens)[0] == ids
        report.per_prompt.append(entry)
        report.iterations += stats.iterations
        report.emitted_after_prefill += stats.accepted_tokens + stats.iterations
    return report


def main(argv: list[str] | None = None) -> int:
    import logging
    from dataclasses import replace

    from server.engine_args import OFFLOAD_PRESET, add_engine_arguments, engine_config_from_args
    from subspec_core.build import build_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--check-vanilla", action="store_true", help="also run vanilla and check identical tokens")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # Acceptance is a property of the draft: measure it in mode subspec, whatever mode the config names.
    config = replace(engine_config_from_args(args, default_preset=OFFLOAD_PRESET), mode="subspec")
    engine = build_engine(config)
    reference = None
    if args.check_vanilla:
        reference = build_engine(replace(config, mode="vanilla"))
    prompts = first_turn_prompts(engine.tokenizer, limit=args.num_prompts)
    report = measure_acceptance(engine, prompts, max_tokens=args.max_tokens, reference=reference)
    for entry in report.per_prompt:
        print(json.dumps(entry), file=sys.stderr)
    print(json.dumps({"environment": {**device_record(engine.device), **engine_record(engine)},
                      "model": engine.model_name, "prompts": len(prompts), "max_tokens": args.max_tokens,
                      "mean_accept_length": round(report.mean_accept_length, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
