"""`subspec generate`: one prompt through the engine, text streamed to stdout as it is accepted.

With --json the last line of stdout is one JSON object: text, token_ids, finish_reason and stats.
Load progress and the memory plan go to stderr, so stdout stays clean for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from typing import Any

from server.engine_args import add_engine_arguments, engine_config_from_args


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as one user message with the chat template")
    parser.add_argument("--system", default=None, help="a system message (with --chat)")
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    add_engine_arguments(parser)


def prompt_token_ids(tokenizer: Any, text: str, *, chat: bool, system: str | None) -> list[int]:
    """Token ids of a plain prompt, or of a one-turn conversation rendered by the model's chat template."""
    if not chat:
        return list(tokenizer.encode(text, add_special_tokens=True))
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("error: this model's tokenizer has no chat template; run without --chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def run_generate(args: argparse.Namespace) -> int:
    from subspec_core.build import build_engine
    from subspec_core.errors import SetupError
    from subspec_core.startup import quiet_third_party_warnings
    from subspec_core.types import GenerationRequest, SamplingParams

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party_warnings()
    try:
        config = engine_config_from_args(args)
        sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.engine_seed, stop=tuple(args.stop),  # --seed (an engine flag) seeds this request
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # loaders print progress; keep stdout for the answer
            engine = build_engine(config)
    except SetupError as exc:  # a model that cannot be read, a plan that does not fit: one line, what to do
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ids = prompt_token_ids(engine.tokenizer, args.prompt, chat=args.chat, system=args.system)
    request = GenerationRequest(request_id="cli", prompt_token_ids=tuple(ids), sampling=sampling)
    token_ids: list[int] = []
    pieces: list[str] = []
    last = None
    started = time.perf_counter()
    try:
        for event in engine.generate(request):
            token_ids.extend(event.token_ids)
            pieces.append(event.text)
            if not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            last = event
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    assert last is not None and last.stats is not None
    stats = last.stats.as_dict()
    decode_s = max(elapsed - last.stats.prefill_s, 1e-9)
    stats["decode_tokens_per_s"] = round(max(len(token_ids) - 1, 0) / decode_s, 3)
    mode = engine.config.mode  # the mode the engine runs in (mode auto resolved)
    stats["mode"] = mode
    if args.json:
        print(json.dumps({"text": "".join(pieces), "token_ids": token_ids, "finish_reason": last.finish_reason, "stats": stats}))
    else:
        print()
        print(
            f"[{last.finish_reason}] {len(token_ids)} tokens, {stats['decode_tokens_per_s']} tok/s decode, "
            f"mean acceptance length {stats['mean_accept_length']}, {mode} mode",
            file=sys.stderr,
        )
    return 0
