"""GPU check of batched decoding (subspec_core/batch.py, issue #20): four chat prompts decoded together on the real
CUDA path (memory-efficient attention per sequence, the copy stream's ring) each return their solo tokens, up to
a bf16 near-tie (agreement.py), in subspec and vanilla mode; the batch streams the weights once per iteration.
The batched draft levels replayed as CUDA graphs (batch_graphs.py) give the eager levels' tokens.

Skipped without CUDA. On the lent GPU machine: `python -m pytest -q tests/gpu/test_gpu_batch.py`.
"""

from __future__ import annotations

import pytest
import torch

from subspec_core.agreement import compare_generations
from subspec_core.batch import BatchDecoder
from subspec_core.engine import Engine
from subspec_core.types import GenerationRequest, SamplingParams
from tests.gpu.gpu_engines import PROMPTS, chat_prompt, gpu_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SAMPLING = [SamplingParams(max_tokens=64, temperature=0), SamplingParams(max_tokens=40, temperature=0.8, seed=3),
            SamplingParams(max_tokens=64, temperature=0), SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9,
                                                                          seed=5)]


def _engine(mode: str, max_num_seqs: int, cuda_graphs: bool = True) -> Engine:
    return gpu_engine(mode, gpu_memory_budget="6GiB", max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs)


def _decode(batch: BatchDecoder, requests: list[GenerationRequest]) -> tuple[dict[str, list[int]], list[int]]:
    """Three requests admitted together, the fourth after two iterations; each request's tokens, and the weight
    bytes each iteration streamed."""
    layers = batch.engine.target_layers
    got: dict[str, list[int]] = {}
    for request in requests[:3]:
        batch.admit(request)
    iterations = 0
    streamed = []
    while batch.active or len(got) < len(requests):
        if iterations == 2:
            batch.admit(requests[3])  # joins after the others started
        before = layers.h2d_bytes
        for event in batch.step():
            got.setdefault(event.request_id, []).extend(event.token_ids)
        streamed.append(layers.h2d_bytes - before)
        iterations += 1
    torch.cuda.synchronize()
    return got, streamed


@pytest.mark.parametrize("mode", ["subspec", "vanilla"])
def test_four_requests_decoded_together_return_their_solo_tokens(mode) -> None:
    solo, batched = _engine(mode, 1), _engine(mode, 4)
    requests = [GenerationRequest(f"r{i}", chat_prompt(solo, text), params)
                for i, (text, params) in enumerate(zip(PROMPTS, SAMPLING))]
    got, streamed = _decode(BatchDecoder(batched), requests)
    assert len(set(streamed)) == 1  # one weight stream per iteration, prompts riding along
    for request in requests:
        expected = [t for e in solo.generate(request) for t in e.token_ids]
        params = request.sampling
        agreement = compare_generations(solo, request.prompt_token_ids, expected, got[request.request_id],
                                        exact=False, dtype=torch.bfloat16, params=params, seed=params.seed)
        assert agreement.ok, f"{request.request_id}: {agreement}"


def test_batched_draft_levels_replayed_as_cuda_graphs_give_the_eager_tokens() -> None:
    """Four greedy requests, one joining late (new compositions mid-way), decoded with the batched draft levels
    captured and replayed, then eagerly (cuda_graphs false): the same tokens, up to a bf16 near-tie of the target
    (a replayed level may round a draft logit apart, which changes a tree, hence the verify rows beside it)."""
    graphed, eager = _engine("subspec", 4), _engine("subspec", 4, cuda_graphs=False)
    requests = [GenerationRequest(f"r{i}", chat_prompt(graphed, text), SamplingParams(max_tokens=48, temperature=0))
                for i, text in enumerate(PROMPTS)]
    batch = BatchDecoder(graphed)
    tokens, _ = _decode(batch, requests)
    expected, _ = _decode(BatchDecoder(eager), requests)
    graphs = batch.draft_graphs
    assert graphs is not None and graphs.capturing and graphs.replays > graphs.captures > 0
    for request in requests:
        agreement = compare_generations(eager, request.prompt_token_ids, expected[request.request_id],
                                        tokens[request.request_id], exact=False, dtype=torch.bfloat16,
                                        params=request.sampling, seed=None)
        assert agreement.ok, f"{request.request_id}: {agreement}"
