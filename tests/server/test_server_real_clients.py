"""The clients people run, against the real server (default model, subspec mode, real worker): the OpenAI SDK
with logprobs, guidellm's and lm-eval's request bodies replayed as raw HTTP, per-request speculation stats and
the vLLM-named metrics. The logprobs are checked to be the target's own: those of a speculative generation
equal those of one scoring prefill over prompt + output."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from server.api.logprobs import TokenStrings
from tests.server.conftest import API_KEY
from tests.server.server_harness import scrape_metrics

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a story about a lighthouse."}]  # a long answer: 12 tokens, no EOS
TOLERANCE = 1e-3  # fp32 on the CPU: a verify forward over a tree vs a chunked prefill, rounding only


@pytest.fixture(scope="module")
def http(real_server):
    with httpx.Client(base_url=real_server.base_url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(real_server):
    return openai.OpenAI(base_url=f"{real_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ids_of_bytes(default_tokenizer):
    """Token id of each token's bytes (byte-level BPE: one id per byte string, special tokens aside)."""
    strings = TokenStrings(default_tokenizer)
    return {bytes(strings.bytes(i)): i for i in range(len(default_tokenizer))}


def test_chat_logprobs_are_the_targets_and_change_nothing(sdk, http, default_tokenizer, ids_of_bytes):
    model = "SmolLM2-135M-Instruct"
    plain = sdk.chat.completions.create(model=model, messages=STORY, max_tokens=12, temperature=0)
    reply = sdk.chat.completions.create(model=model, messages=STORY, max_tokens=12, temperature=0,
                                        logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == plain.choices[0].message.content  # asking for logprobs changes no token
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 12
    assert "".join(e.token for e in entries) == choice.message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in entries)  # greedy
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob for e in entries)
    assert reply.usage.model_extra["speculative"]["accepted_tokens"] > 0  # speculation did accept tokens
    # Score prompt + output in one prefill (echo, max_tokens 0): the same numbers, position by position.
    prompt_text = default_tokenizer.apply_chat_template(STORY, add_generation_prompt=True, tokenize=False)
    prompt_ids = default_tokenizer.encode(prompt_text, add_special_tokens=False)
    assert len(prompt_ids) == reply.usage.prompt_tokens
    output_ids = [ids_of_bytes[bytes(e.bytes)] for e in entries]
    scored = http.post("/v1/completions", json={"prompt": prompt_ids + output_ids, "max_tokens": 0, "echo": True,
                                                "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert scored[-12:] == pytest.approx([e.logprob for e in entries], abs=TOLERANCE)
    # Streamed, the same entries arrive chunk by chunk.
    stream = sdk.chat.completions.create(model=model, messages=STORY, max_tokens=12, temperature=0,
                                         logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    # (the repeated prompt's rows come from the cache: its last token's row is recomputed alone, which rounds
    # differently from a whole-prompt prefill, so values agree to fp32 rounding, tokens exactly)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=TOLERANCE)


def test_sdk_completions_with_echo_and_logprobs(sdk):
    completion = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                        max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = completion.choices[0]
    assert choice.text.startswith("The capital of France is") and len(choice.text) > len("The capital of France is")
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in logprobs.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text and logprobs.text_offset[0] == 0


def test_lm_eval_loglikelihood_and_generate_requests(http, default_tokenizer):
    """lm-eval `local-completions`: loglikelihood sends token ids with echo, logprobs 1 and max_tokens 1, then
    sums token_logprobs[ctxlen:-1] and checks greediness against top_logprobs; generate_until sends stops."""
    context = default_tokenizer.encode("The capital of France is")
    continuation = default_tokenizer.encode(" Paris")
    body = {"model": "SmolLM2-135M-Instruct", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    out = http.post("/v1/completions", json=body).json()
    choice = sorted(out["choices"], key=lambda c: c["index"])[0]
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == len(context) + len(continuation) + 1 and token_logprobs[0] is None
    ctxlen = len(context)
    logprob = sum(token_logprobs[ctxlen:-1])
    is_greedy = all(tok == max(top.values()) for tok, top in
                    zip(token_logprobs[ctxlen:-1], choice["logprobs"]["top_logprobs"][ctxlen:-1]))
    assert -20 < logprob < 0 and is_greedy  # " Paris" is what the model itself writes next
    generate = {"prompt": [context], "model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
                "stop": ["."], "seed": 1234}
    choice = http.post("/v1/completions", json=generate).json()["choices"][0]
    assert choice["text"] == " Paris" and choice["finish_reason"] == "stop", choice


def test_guidellm_streaming_requests(http):
    """guidellm's chat and text requests: continuous usage stats, ignore_eos, stop null, content parts."""
    chat = {"model": "SmolLM2-135M-Instruct", "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": 8, "stop": None, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me about GPUs."}]}]}
    text = {"model": "SmolLM2-135M-Instruct", "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 8, "stop": None, "ignore_eos": True, "prompt": "Tell me about GPUs."}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200, response.read()
            assert "X-SubSpec-Ignored-Fields" not in response.headers
            lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        assert all(c["usage"] is not None for c in chunks)
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 8  # ignore_eos: all 8 tokens
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["speculative"]["iterations"] >= 1


def test_usage_speculative_matches_the_vllm_counters(http):
    before = scrape_metrics(http)
    body = {"messages": QUESTION, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    speculative = http.post("/v1/chat/completions", json=body).json()["usage"]["speculative"]
    after = scrape_metrics(http)
    labels = '{engine="0",model_name="SmolLM2-135M-Instruct"}'

    def delta(name: str) -> float:
        return after[f"vllm:spec_decode_num_{name}_total{labels}"] - before.get(f"vllm:spec_decode_num_{name}_total"
                                                                              f"{labels}", 0)

    assert delta("draft_tokens") == speculative["drafted_tokens"] > 0
    assert delta("accepted_tokens") == speculative["accepted_tokens"]
    # every iteration but a last one-token step drafts a tree
    assert speculative["iterations"] - 1 <= delta("drafts") <= speculative["iterations"]
    tau = (speculative["accepted_tokens"] + speculative["iterations"]) / speculative["iterations"]
    assert math.isclose(speculative["mean_accept_length"], tau, abs_tol=1e-4) and tau > 1
