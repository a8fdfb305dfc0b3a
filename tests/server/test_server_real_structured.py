"""Structured outputs through the HTTP API with real clients, on the real default model (served resident, as
`subspec serve` starts it, with the Hermes tool template): the OpenAI SDK's `parse`, instructor's JSON,
JSON_SCHEMA and TOOLS modes, LangChain's `with_structured_output`, `tool_choice: "required"`, twenty schemas
whose every output parses and validates, vLLM's extensions on completions, and the Responses API's
`text.format`. That the constraint leaves speculation lossless is tests/core/test_constrained.py's job."""

from __future__ import annotations

import json
from enum import Enum
from typing import Iterator, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server.engine_args import DEFAULT_PRESET
from subspec_core.config import load_yaml
from tests.server.conftest import TOOLS_SERVE_ARGS
from tests.server.server_harness import ServeProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def structured_server(tmp_path_factory: pytest.TempPathFactory, default_model_path) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path_factory.mktemp("structured"), "structured", load_yaml(DEFAULT_PRESET),
                           *TOOLS_SERVE_ARGS)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(structured_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{structured_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give me an example {topic} as JSON."}]


def short(max_length: int = 24) -> dict:
    return {"type": "string", "maxLength": max_length}


# Twenty schemas: nested objects, arrays, enums, anyOf, required and optional fields, patterns, formats, bounds
SCHEMAS = [
    {"type": "object", "properties": {"name": short(), "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": short(12), "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}, "required": ["id"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}}, "required": ["price"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, short()]}}, "required": ["value"]},
    {"type": "object", "properties": {"title": short(), "subtitle": short()}, "required": ["title"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
        "sku": short(8), "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 40}},
     "required": ["email"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer"}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 10}, "maxItems": 4}},
     "required": ["scores"]},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 20}}, "required": ["note"]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": short(12)},
     "required": ["kind", "name"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
     "required": ["ratio"]},
]


def strict(schema: dict) -> dict:
    """The schema as OpenAI's strict mode wants it: every object closed to other properties."""
    if isinstance(schema, dict):
        schema = {key: strict(value) if key in ("items", "anyOf", "properties") or isinstance(value, dict) else value
                  for key, value in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def test_twenty_schemas_every_output_parses_and_validates(client):
    assert len(SCHEMAS) == 20
    for number, schema in enumerate(map(strict, SCHEMAS)):
        response = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=ask("record"), temperature=0, max_tokens=160,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{number}", "schema": schema,
                                                                    "strict": True}})
        choice = response.choices[0]
        assert choice.finish_reason == "stop", (number, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


class Color(str, Enum):
    RED = "red"
    GREEN = "green"


class Pet(BaseModel):
    name: str = Field(max_length=16)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Shelter(BaseModel):
    city: str = Field(max_length=16)
    pets: list[Pet] = Field(max_length=2)
    favourite: Color


EXAMPLE_PET = 'Give me a pet as JSON, like {"name": "Rex", "kind": "dog", "age": 3}.'


def test_the_sdks_parse_returns_objects(client):
    for model in (Pet, Shelter):
        completion = client.chat.completions.parse(model="SmolLM2-135M-Instruct", messages=ask(model.__name__.lower()),
                                                   response_format=model, temperature=0, max_tokens=200)
        assert isinstance(completion.choices[0].message.parsed, model)
    # json_object constrains the syntax only: the prompt shows the object (this 135M model, asked freely, nests
    # or repeats keys until max_tokens, with or without a constraint)
    json_object = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", response_format={"type": "json_object"}, max_tokens=200, temperature=0,
        messages=[{"role": "user", "content": 'Write this JSON object exactly: {"ok": true}'}])
    assert json_object.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(json_object.choices[0].message.content), dict)


def test_an_invalid_schema_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ask("thing"), response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}})
    error = info.value.body
    assert error["param"] == "response_format.json_schema.schema" and "strin" in error["message"]


def test_instructor_json_json_schema_and_tools_modes(structured_server):
    import instructor

    for mode in (instructor.Mode.JSON, instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        patched = instructor.from_openai(openai.OpenAI(base_url=f"{structured_server.base_url}/v1", api_key="x"),
                                         mode=mode)
        pet = patched.chat.completions.create(
            model="SmolLM2-135M-Instruct", response_model=Pet, max_retries=0, temperature=0, max_tokens=200,
            messages=[{"role": "user", "content": EXAMPLE_PET}])  # JSON mode is json_object: syntax only
        assert isinstance(pet, Pet), mode


def test_langchain_with_structured_output(structured_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{structured_server.base_url}/v1", api_key="x", model="SmolLM2-135M-Instruct",
                     temperature=0, max_tokens=160, max_retries=0)
    for method in ("json_schema", "function_calling"):
        pet = llm.with_structured_output(Pet, method=method).invoke("Describe a pet.")
        assert isinstance(pet, Pet), method


def test_tool_choice_required_gives_a_call_whose_arguments_match(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": short(20), "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}]
    response = client.chat.completions.create(model="SmolLM2-135M-Instruct", tools=tools, tool_choice="required",
                                              messages=[{"role": "user", "content": "Weather in Paris?"}],
                                              temperature=0, max_tokens=120)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), tools[0]["function"]["parameters"])


def test_completions_and_responses_take_constraints(structured_server):
    base = structured_server.base_url
    regex = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "prompt": "The code is", "max_tokens": 20, "temperature": 0, "structured_outputs": {"regex": "[A-F]{4}-[0-9]{2}"}})
    assert regex.status_code == 200, regex.text
    assert __import__("re").fullmatch("[A-F]{4}-[0-9]{2}", regex.json()["choices"][0]["text"])
    choice = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Pick one."}], "max_tokens": 8, "guided_choice": ["left", "right"]})
    assert choice.json()["choices"][0]["message"]["content"] in ("left", "right")
    schema = {"type": "object", "properties": {"city": short(16)}, "required": ["city"]}
    response = httpx.post(f"{base}/v1/responses", timeout=120, json={
        "input": "Name a city as JSON.", "max_output_tokens": 60, "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}}})
    body = response.json()
    assert response.status_code == 200 and body["text"]["format"]["type"] == "json_schema", body
    jsonschema.validate(json.loads(body["output"][0]["content"][0]["text"]), schema)
