"""Continuous batching through `subspec serve --max-num-seqs 4` with the real default model (subspec mode, every
layer streamed; and the default preset, resident on a CPU): concurrent greedy requests each return exactly the text
they get alone, and a newcomer streams its first token while the others are still generating."""

from __future__ import annotations

import json
import re
import threading
import time

from typing import Iterator

import httpx
import pytest

from server.engine_args import DEFAULT_PRESET
from subspec_core.config import load_yaml
from tests.server.conftest import API_KEY
from tests.server.server_harness import ServeProcess, scrape_metrics

pytestmark = pytest.mark.slow

# different prompts and lengths: each is decoded beside the others, and must equal its solo run
PROMPTS = (("The capital of France is", 8), ("def fibonacci(n):", 14), ("Once upon a time, in a small village,", 20),
           ("List three primary colors:", 11))


def complete(base_url: str, prompt: str, max_tokens: int, headers: dict | None = None, **sampling) -> str:
    response = httpx.post(f"{base_url}/v1/completions", headers=headers or {}, timeout=600,
                          json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **sampling})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_four_concurrent_greedy_requests_each_return_their_solo_text(real_server: ServeProcess,
                                                                     real_server_batch: ServeProcess):
    solo = {prompt: complete(real_server.base_url, prompt, n, {"Authorization": f"Bearer {API_KEY}"})
            for prompt, n in PROMPTS}
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p, n=n: together.__setitem__(p, complete(real_server_batch.base_url,
                                                                                           p, n)))
               for p, n in PROMPTS]
    with httpx.Client(base_url=real_server_batch.base_url) as http:
        before = scrape_metrics(http)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        after = scrape_metrics(http)
    assert together == solo
    steps = after["subspec_batch_size_count"] - before.get("subspec_batch_size_count", 0)
    sequences = after["subspec_batch_size_sum"] - before.get("subspec_batch_size_sum", 0)
    assert steps > 0 and sequences / steps > 1.5  # the requests shared forwards
    rows = after["subspec_forward_rows_sum"] - before.get("subspec_forward_rows_sum", 0)
    assert rows > sequences  # trees of several nodes, and prompt chunks


def first_token_and_end(base_url: str, prompt: str, max_tokens: int, out: dict) -> None:
    first = None
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=600, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}) as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = time.monotonic()
    out[prompt] = (first, time.monotonic())


def test_a_newcomer_streams_its_first_token_before_any_running_request_finishes(real_server_batch: ServeProcess):
    out: dict = {}
    running = [threading.Thread(target=first_token_and_end, args=(real_server_batch.base_url, p, 40, out))
               for p, _ in PROMPTS[:3]]
    for thread in running:
        thread.start()
    deadline = time.monotonic() + 300
    while httpx.get(f"{real_server_batch.base_url}/health").json()["running"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # they are generating
    late = threading.Thread(target=first_token_and_end, args=(real_server_batch.base_url, PROMPTS[3][0], 4, out))
    late.start()
    for thread in (*running, late):
        thread.join(600)
    late_first = out[PROMPTS[3][0]][0]
    assert late_first is not None and late_first < min(out[p][1] for p, _ in PROMPTS[:3])


def test_seeded_sampling_and_an_abort_leave_every_other_request_exact(real_server: ServeProcess,
                                                                       real_server_batch: ServeProcess):
    """Seeded sampling beside greedy requests, and a fourth request whose client disconnects after its first
    chunk: the others return their solo text."""
    kept = [(prompt, n, {"temperature": 0.8, "seed": 17 + i} if i == 1 else {}) for i, (prompt, n) in
            enumerate(PROMPTS[:3])]
    solo = {prompt: complete(real_server.base_url, prompt, n, {"Authorization": f"Bearer {API_KEY}"}, **sampling)
            for prompt, n, sampling in kept}
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p, n=n, s=s: together.__setitem__(
        p, complete(real_server_batch.base_url, p, n, **s))) for p, n, s in kept]
    for thread in threads:
        thread.start()
    with httpx.stream("POST", f"{real_server_batch.base_url}/v1/completions", timeout=600, json={
            "prompt": PROMPTS[3][0], "max_tokens": 60, "ignore_eos": True, "stream": True}) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))  # then hang up
    for thread in threads:
        thread.join(600)
    assert together == solo
    deadline = time.monotonic() + 60
    while httpx.get(f"{real_server_batch.base_url}/health").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with httpx.Client(base_url=real_server_batch.base_url) as http:
        assert scrape_metrics(http)['subspec_requests_total{endpoint="/v1/completions",status="499"}'] >= 1


def test_a_structured_output_decodes_inside_the_batch_and_everyone_gets_their_solo_text(
        real_server: ServeProcess, real_server_batch: ServeProcess):
    """A constrained request is a batch member like any other: it joins two running requests, so some forwards serve
    three sequences (it running alone never could), and each of the three returns its one-at-a-time text."""
    regex = {"structured_outputs": {"regex": "[A-F]{4}-[0-9]{2}"}}
    jobs = [(PROMPTS[2][0], 20, {}), (PROMPTS[0][0], 12, {}), ("The code is", 20, regex)]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    solo = [complete(real_server.base_url, p, n, auth, **extra) for p, n, extra in jobs]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, p=p, n=n, e=e: together.__setitem__(
        i, complete(real_server_batch.base_url, p, n, **e))) for i, (p, n, e) in enumerate(jobs)]
    with httpx.Client(base_url=real_server_batch.base_url) as http:
        before = scrape_metrics(http)
        for thread in threads[:2]:
            thread.start()
        deadline = time.monotonic() + 300
        while http.get("/health").json()["running"] < 2:  # the free ones are decoding: the constrained one joins them
            assert time.monotonic() < deadline
            time.sleep(0.05)
        threads[2].start()
        for thread in threads:
            thread.join(600)
        after = scrape_metrics(http)
    assert [together[i] for i in range(len(jobs))] == solo
    assert re.fullmatch("[A-F]{4}-[0-9]{2}", together[2])

    def three_or_more(metrics: dict[str, float]) -> float:
        return metrics.get("subspec_batch_size_count", 0) - metrics.get('subspec_batch_size_bucket{le="2.0"}', 0)

    assert 'subspec_batch_size_bucket{le="2.0"}' in after and three_or_more(after) > three_or_more(before)


@pytest.fixture(scope="module")
def resident_server(tmp_path_factory: pytest.TempPathFactory, default_model_path) -> Iterator[ServeProcess]:
    """The default preset (mode auto: resident on a CPU) with --max-num-seqs 4."""
    server = ServeProcess(tmp_path_factory.mktemp("resident4"), "resident4", load_yaml(DEFAULT_PRESET),
                          "--max-num-seqs", "4")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_resident_mode_batches_too_with_each_requests_solo_text(resident_server):
    """Each request alone first (one at a time: its solo text; a lone batch member is the one-at-a-time engine's
    tokens, tests/core/test_batch.py), then all four at once: the same texts, from forwards serving several."""
    base = resident_server.base_url
    solo = {prompt: complete(base, prompt, n) for prompt, n in PROMPTS}
    with httpx.Client(base_url=base) as http:
        before = scrape_metrics(http)
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p, n=n: together.__setitem__(p, complete(base, p, n)))
               for p, n in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert together == solo
    with httpx.Client(base_url=base) as http:
        after = scrape_metrics(http)
    sequences = after["subspec_batch_size_sum"] - before["subspec_batch_size_sum"]
    assert sequences / (after["subspec_batch_size_count"] - before["subspec_batch_size_count"]) > 1.5
