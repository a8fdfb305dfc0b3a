"""Fixtures for the engine-core tests: CUDA's attention layout, a tokenizer for tiny engines, a one-thread torch
setting.

Every test here runs with SDPA returning CUDA's output layout (tests/cuda_layouts.py), so the prefill, draft,
verify, vanilla, logprobs and lossless tests would fail on code that only reads the CPU's layout right.
`pytest --cpu-sdpa-layout` turns the imitation off.

Tiny models run hundreds of small matmuls per generation; on a shared 2-core machine torch's intra-op
thread pool spends far more time contending than computing (measured: ~30x slower with 2 threads under
load). Modules that run many small ops opt in with `pytestmark = pytest.mark.usefixtures("single_torch_thread")`;
the setting is restored when the module ends.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from tests.cuda_layouts import cuda_layouts


@pytest.fixture(scope="package", autouse=True)
def cuda_attention_layout(request: pytest.FixtureRequest) -> Iterator[None]:
    """SDPA's output in CUDA's layout for the whole package (a copy per attention call: ~nothing)."""
    if request.config.getoption("--cpu-sdpa-layout"):
        yield
        return
    with cuda_layouts():
        yield


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
