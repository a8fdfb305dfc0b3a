"""The official OpenAI SDK against the real server (default model, real worker process): sync and async,
streaming and not, chat and text completions, and the SDK's error classes."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server.conftest import API_KEY

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sdk(real_server):
    client = openai.OpenAI(base_url=f"{real_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    return client, model


def test_models_list(sdk):
    client, model = sdk
    assert model == "SmolLM2-135M-Instruct"
    assert client.models.retrieve(model).id == model


def test_chat_sync(sdk):
    client, model = sdk
    response = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
    choice = response.choices[0]
    assert response.id.startswith("chatcmpl-") and response.model == model and response.object == "chat.completion"
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert 0 < usage.completion_tokens <= 16 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_sync_stream_matches(sdk):
    client, model = sdk
    whole = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_sync_and_stream(sdk):
    client, model = sdk
    whole = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 8
    streamed = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_async_chat_and_completions(sdk, real_server):
    _, model = sdk

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=f"{real_server.base_url}/v1", api_key=API_KEY, max_retries=0,
                                    timeout=120)
        chat = await client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
        stream = await client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                                      temperature=0, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == chat.choices[0].message.content
        completion = await client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0)
        stream = await client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                                 stream=True)
        assert "".join([c.choices[0].text async for c in stream]) == completion.choices[0].text
        await client.close()

    asyncio.run(main())


def test_sampling_with_a_seed_is_reproducible(sdk):
    client, model = sdk
    texts = [client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0.9,
                                            top_p=0.95, seed=1234, extra_body={"top_k": 40}).choices[0].message.content
             for _ in range(2)]
    assert texts[0] == texts[1]


def test_sdk_error_classes(sdk, real_server):
    client, model = sdk
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{real_server.base_url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="strin"):
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, n=2)
    assert client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4).choices
