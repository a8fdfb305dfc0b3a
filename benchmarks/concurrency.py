"""Concurrent clients against a running server: what each of them waits, and what the weight stream costs.

    python -m benchmarks.concurrency --json [--levels 1,2,4 --max-tokens 64 --config configs/default-offload.yaml]
    python -m benchmarks.concurrency --json --url http://host:8000      # a server already running

Starts `subspec serve` with the preset (or uses `--url`), then for each concurrency level c runs c streaming
chat clients at once, each on its own MT-Bench first turn (greedy, `ignore_eos`, `max_tokens` each), and
reports per level:

- `aggregate_tok_s`: completion tokens of all c requests / the level's wall time;
- `ttft_s` p50/p95: request sent to the first content chunk;
- `itl_s` p50/p95: the gaps between a request's content chunks (one chunk per engine event, which may carry
  several tokens: the latency a reader sees, as vLLM's benchmark measures it);
- `h2d_bytes_per_token`: `subspec_h2d_bytes_total` / `subspec_generation_tokens_total`, both read from
  /metrics around the level (weights streamed per generated token: what batching divides);
- `sequences_per_forward`: the mean of `subspec_batch_size` from /metrics where the server exports it, else
  null (a server that runs one request at a time: 1 by construction).

`ratio_4_vs_1` is the aggregate tokens/s at the highest level over the lowest. Every request must finish with
`finish_reason: length` and exactly `max_tokens` tokens, else the run fails: a lost or cut request is not a
timing. Extra arguments after `--` go to `subspec serve` (e.g. `-- --simulate-link-gbps 0.25`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.mt_bench import load_questions

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = REPO_ROOT / "configs" / "default-offload.yaml"


@dataclass
class RequestTiming:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def stream_chat(base_url: str, model: str, question: str, max_tokens: int, timing: RequestTiming) -> None:
    """One streamed greedy chat, timing its content chunks."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    last = None
    try:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=3600) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}"
                return
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    timing.error = json.dumps(chunk["error"])[:200]
                    return
                if chunk.get("usage"):
                    timing.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            timing.ttft_s = now - sent
                        else:
                            timing.gaps_s.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        timing.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as exc:
        timing.error = f"{type(exc).__name__}: {exc}"


def scrape(base_url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)


def run_level(base_url: str, model: str, questions: list[str], max_tokens: int) -> dict[str, Any]:
    """Len(questions) clients at once; their timings and the metrics' deltas."""
    before = scrape(base_url)
    timings = [RequestTiming() for _ in questions]
    threads = [threading.Thread(target=stream_chat, args=(base_url, model, q, max_tokens, t)) for q, t in zip(questions, timings)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = scrape(base_url)
    failed = [t.error or f"finish {t.finish_reason}, {t.completion_tokens} tokens" for t in timings
              if t.error or t.finish_reason != "length" or t.completion_tokens != max_tokens]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(timings)} requests did not complete: {failed}")

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    tokens = sum(t.completion_tokens for t in timings)
    batch_count = delta("subspec_batch_size_count")
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    gaps = [g for t in timings for g in t.gaps_s]
    return {
        "clients": len(questions),
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "aggregate_tok_s": round(tokens / wall, 4),
        "ttft_s": {"p50": percentile(ttfts, 0.5), "p95": percentile(ttfts, 0.95)},
        "itl_s": {"p50": percentile(gaps, 0.5), "p95": percentile(gaps, 0.95)},
        "h2d_bytes_per_token": round(delta("subspec_h2d_bytes_total") / max(1.0, delta("subspec_generation_tokens_total"))),
        "sequences_per_forward": (round(delta("subspec_batch_size_sum") / batch_count, 3) if batch_count else None),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(config: str, serve_args: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", config, "--host", "127.0.0.1",
                                "--port", str(port), "--max-queue", "64", *serve_args], cwd=REPO_ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; its log: {log_path}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"the server did not become healthy in 600 s; its log: {log_path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(PRESET), help="preset for the server it starts")
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    parser.add_argument("--levels", default="1,2,4", help="concurrent clients per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    questions = [q["turns"][0] for q in load_questions()]
    process = None
    base_url = args.url
    if base_url is None:
        process, base_url = start_server(args.config, serve_args, Path(os.environ.get("TMPDIR", "/tmp"))
                                         / "subspec-concurrency-server.log")
    try:
        model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        stream_chat(base_url, model, questions[-1], 4, RequestTiming())  # warm-up: first-request costs off the clock
        results = []
        offset = 0
        for clients in levels:  # each level on prompts of its own, so no level reuses another's prefix
            results.append(run_level(base_url, model, questions[offset : offset + clients], args.max_tokens))
            offset += clients
            print(f"{clients} clients: {results[-1]['aggregate_tok_s']} tok/s aggregate", file=sys.stderr)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    low, high = results[0], results[-1]
    report = {
        "server": base_url if args.url else {"config": args.config, "serve_args": serve_args},
        "max_tokens": args.max_tokens,
        "levels": results,
        f"ratio_{high['clients']}_vs_{low['clients']}": round(high["aggregate_tok_s"] / low["aggregate_tok_s"], 3),
        "h2d_per_token_ratio": (round(high["h2d_bytes_per_token"] / low["h2d_bytes_per_token"], 3)
                                if low["h2d_bytes_per_token"] else None),
    }
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
