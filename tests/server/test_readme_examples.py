"""The README's logprobs and tool-call examples, run as written against the real server started with the
README's flags for them (`<!-- README server: ... -->`: the default model with configs/templates/
hermes-tools.jinja, which gives it tool support; the test preset's small draft tree changes no output token):
each code block after a `<!-- README example: ... -->` marker. curl commands are replayed with httpx (same
URL, headers and body); Python blocks run in a subprocess with only the server's address replaced."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import TOOLS_SERVE_ARGS
from tests.server.server_harness import REPO_ROOT

pytestmark = pytest.mark.slow

README_URL = "http://127.0.0.1:8000"
MARKER = "<!-- README example:"
SERVER_MARKER = "<!-- README server:"


def examples(language: str, marker: str = MARKER) -> list[str]:
    """Code blocks of `language` that follow a README marker."""
    text = (REPO_ROOT / "README.md").read_text()
    pattern = re.escape(marker) + r"[^\n]*\n```" + language + r"\n(.*?)```"
    return re.findall(pattern, text, flags=re.S)


def curl_commands(block: str) -> list[list[str]]:
    """Each `curl ...` command of a bash block (line continuations and multi-line quoted bodies included)."""
    commands = re.split(r"\n(?=curl )", "\n" + block.replace("\\\n", " "))
    return [shlex.split(command, comments=True) for command in commands if command.startswith("curl ")]


def replay(args: list[str], base_url: str) -> httpx.Response:
    """Send what `curl ARGS` would send (-H headers, -d body, a POST when there is a body)."""
    url, headers, body = None, {}, None
    rest = iter(args[1:])
    for arg in rest:
        if arg == "-H":
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(rest)
        elif arg.startswith("http"):
            url = arg.replace(README_URL, base_url)
        else:
            assert arg in ("-N", "-s"), f"unexpected curl argument {arg}"
    assert url is not None
    if body is None:
        return httpx.get(url, headers=headers, timeout=120)
    return httpx.post(url, headers=headers, content=body.encode(), timeout=120)


def test_readme_has_the_examples():
    assert len(examples("bash")) == 1 and len(examples("python")) == 1


def test_the_examples_server_is_started_as_the_readme_says():
    """real_server_tools (conftest) passes the README's flags; its template path exists from the repo root."""
    [start] = examples("bash", SERVER_MARKER)
    assert shlex.split(start) == ["subspec", "serve", *TOOLS_SERVE_ARGS]
    assert (REPO_ROOT / TOOLS_SERVE_ARGS[1]).is_file()


def test_readme_curl_examples(real_server_tools):
    [block] = examples("bash")
    logprobs, scored, tool_call = [replay(args, real_server_tools.base_url).json() for args in curl_commands(block)]
    entries = logprobs["choices"][0]["logprobs"]["content"]
    assert entries and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert "".join(e["token"] for e in entries) == logprobs["choices"][0]["message"]["content"]
    assert scored["choices"][0]["text"] == "The capital of France is Paris"
    values = scored["choices"][0]["logprobs"]["token_logprobs"]
    assert values[0] is None and len(values) == scored["usage"]["prompt_tokens"] and all(v < 0 for v in values[1:])
    call = tool_call["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}


def test_readme_python_example(real_server_tools):
    [block] = examples("python")
    code = block.replace(README_URL, real_server_tools.base_url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'iterations'" in lines[-3]  # usage.speculative
    assert lines[-2] == "tool_calls get_weather {'city': 'Paris'}"
    assert "21" in lines[-1]
