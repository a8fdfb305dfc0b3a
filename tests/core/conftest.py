"""Fixtures for the engine-core tests: a tokenizer for tiny engines, and a one-thread torch setting.

Tiny models run hundreds of small matmuls per generation; on a shared 2-core machine torch's intra-op
thread pool spends far more time contending than computing (measured: ~30x slower with 2 threads under
load). Modules that run many small ops opt in with `pytestmark = pytest.mark.usefixtures("single_torch_thread")`;
the setting is restored when the module ends.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run the module's tests with one torch intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """The default model's tokenizer (ids < 512 are ordinary tokens): enough for tiny random-weight engines."""
    from subspec_core.config import EngineConfig
    from subspec_core.loading import load_tokenizer

    return load_tokenizer(EngineConfig())
