"""Fixtures for tests/server.

Fake-engine servers are built inside the test modules (fast). The `real_*` session fixtures run
`python -m server serve` in a subprocess with the real default model through the real worker process,
with a small draft tree so CPU runs stay quick; each is started once, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.server.server_harness import ServeProcess

API_KEY = "sk-subspec-test"
# The README's start command for its tool-call examples, after `subspec serve` (test_readme_examples checks
# the README gives exactly these): the Hermes-style template that gives the default model tool support (its
# own has none), a path relative to the repository root, where the servers run.
TOOLS_SERVE_ARGS = ("--chat-template", "configs/templates/hermes-tools.jinja")
# The default model as the paper runs big ones (every layer streamed, 4-bit substitute draft), with a
# small tree and context so each iteration is cheap on a CPU.
REAL_ENGINE = {
    "model": "default",
    "mode": "subspec",
    "max_model_len": 512,
    "max_resident_layers": 0,
    "gpu_memory_budget": "2GiB",
    "speculation": {"max_depth": 6, "topk": 4},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _serve(tmp_path_factory: pytest.TempPathFactory, name: str, server: dict, *args: str) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path_factory.mktemp(name), name, {**REAL_ENGINE, "server": server}, *args)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeProcess]:
    """The main server: API key required, a roomy queue, no deadline."""
    yield from _serve(tmp_path_factory, "main", {"max_queue": 8}, "--api-key", API_KEY)


@pytest.fixture(scope="session")
def real_server_batch(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeProcess]:
    """Four requests decoded together (--max-num-seqs 4): continuous batching through the real worker."""
    yield from _serve(tmp_path_factory, "batch", {"max_queue": 8}, "--max-num-seqs", "4")


@pytest.fixture(scope="session")
def real_server_queue1(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeProcess]:
    """One request may wait behind the running one (queue-full and worker-crash tests)."""
    yield from _serve(tmp_path_factory, "queue1", {}, "--max-queue", "1")


@pytest.fixture(scope="session")
def real_server_deadline(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeProcess]:
    """Requests get 3 s from arrival to their last token."""
    yield from _serve(tmp_path_factory, "deadline", {"request_timeout_s": 3})


@pytest.fixture(scope="session")
def real_server_tools(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeProcess]:
    """No API key, and the README's tool-call start command: tool calls and the README examples."""
    yield from _serve(tmp_path_factory, "tools", {}, *TOOLS_SERVE_ARGS)
