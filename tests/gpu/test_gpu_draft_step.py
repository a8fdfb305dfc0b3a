"""GPU checks of the lean draft step and the streaming ring: CUDA-graph replay equals eager drafting, a draft
step never synchronises with the host, and streamed logits survive injected copy and compute delays.

Skipped without CUDA. Run on the lent GPU: `python -m pytest -q tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from subspec_core.engine import Engine
from subspec_core.types import GenerationRequest, SamplingParams
from tests.gpu.gpu_engines import chat_prompt, gpu_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXT = "Write a short poem about a lighthouse and explain its imagery."


def _prompt(engine: Engine) -> tuple[int, ...]:
    return chat_prompt(engine, TEXT)


def _greedy(engine: Engine, max_tokens: int = 64) -> list[int]:
    request = GenerationRequest("g", _prompt(engine), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [t for event in engine.generate(request) for t in event.token_ids]


def test_graphed_drafting_equals_eager_drafting_fp32() -> None:
    graphed = gpu_engine("subspec", dtype="float32", cuda_graphs=True)
    eager = gpu_engine("subspec", dtype="float32", cuda_graphs=False)
    assert graphed.drafter.graphed and not eager.drafter.graphed
    drafter, depth, tokens = graphed.drafter, graphed.config.speculation.max_depth, 320
    first = drafter.bucket_for(committed=len(_prompt(graphed)), depth=depth)
    assert drafter.bucket_for(committed=len(_prompt(graphed)) + tokens - depth - 2, depth=depth) is not first, \
        "the run must replay more than one attention bucket's graphs"
    output = _greedy(graphed, tokens)
    assert output == _greedy(eager, tokens)
    vanilla = gpu_engine("vanilla", dtype="float32")
    assert output[:64] == _greedy(vanilla)


def test_graphed_drafting_equals_eager_drafting_bf16() -> None:
    """In bf16, the GPU's dtype, with the engine's chosen attention kernels (memory-efficient for the masked calls,
    flash for the one-token step): replaying the captured graphs drafts the very trees launching every op does,
    so the same tokens come out."""
    graphed = gpu_engine("subspec", dtype="bfloat16", cuda_graphs=True)
    eager = gpu_engine("subspec", dtype="bfloat16", cuda_graphs=False)
    try:
        assert graphed.drafter.graphed and not eager.drafter.graphed
        assert graphed.attention.as_dict()["draft_level"] == "efficient"
        prompt = list(range(1, 40))
        trees = []
        with torch.inference_mode():
            for engine in (graphed, eager):
                engine.prompt_logits(prompt)
                root = torch.ones(1, dtype=torch.long, device="cuda")
                length = torch.full((1,), len(prompt), dtype=torch.long, device="cuda")
                tree = engine.drafter.grow(root_token=root, prefix_length=length, depth=engine.config.speculation.max_depth)
                trees.append((tree.tokens.tolist(), tree.parents.tolist()))
        assert trees[0] == trees[1]
        assert _greedy(graphed) == _greedy(eager)
    finally:
        graphed.close()
        eager.close()


def test_a_draft_tree_never_synchronises_with_the_host() -> None:
    engine = gpu_engine("subspec", cuda_graphs=False)  # eager: every op is launched and checked
    prompt = list(range(1, 40))
    with torch.inference_mode():
        engine.prompt_logits(prompt)
        root = torch.ones(1, dtype=torch.long, device="cuda")
        length = torch.full((1,), len(prompt), dtype=torch.long, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine.drafter.grow(root_token=root, prefix_length=length, committed=len(prompt),
                                depth=engine.config.speculation.max_depth)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_streamed_logits_hold_under_injected_copy_and_compute_delays(monkeypatch) -> None:
    """The ring's events order copies and compute: slowing either stream must not change a logit."""
    streamed, resident = gpu_engine("vanilla"), gpu_engine("resident", max_resident_layers=None)
    ids = streamed.tokenizer("Delays on either stream must not change what the layers compute.")["input_ids"]
    expected = resident.prompt_logits(ids)
    streamer = streamed.target_layers.streamer
    issue_copy, acquire = type(streamer)._issue_copy, type(streamer).acquire

    def slow_copy(self) -> None:
        with torch.cuda.stream(self.copies.stream):
            torch.cuda._sleep(2_000_000)  # ~1 ms of spinning before the copy is even issued on the copy stream
        issue_copy(self)

    def slow_compute(self, layer_id: int, while_waiting=None):  # noqa: ANN202
        torch.cuda._sleep(2_000_000)  # the compute stream lags behind, so the ring's free events matter
        return acquire(self, layer_id, while_waiting)

    for patch in ({"_issue_copy": slow_copy}, {"acquire": slow_compute}):
        with monkeypatch.context() as m:
            for name, fn in patch.items():
                m.setattr(type(streamer), name, fn)
            got = streamed.prompt_logits(ids)
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=1e-2)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_top_p_over_a_verify_stays_within_the_workspace_the_planner_reserves():
    """Top-p over a 193-row verify of a Qwen-sized vocabulary, all rows at once: its peak beyond the logits stays
    within what the plan counts for choosing from them (the logits and the sampling peak, planner.logits_bytes)."""
    from subspec_core.planner import logits_bytes
    from subspec_core.sampling import process_logits

    rows, vocab = 193, 151_936
    logits = torch.randn(rows, vocab, device="cuda") * 3
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    processed = process_logits(logits, SamplingParams(temperature=0.8, top_p=0.9))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    counted = logits_bytes(rows=rows, vocab_size=vocab)  # what the planner reserves: logits + sampling peak
    assert extra <= counted, (extra, counted)
    assert torch.isfinite(processed).sum(-1).min() >= 1


@pytest.mark.parametrize("mode", ["vanilla", "resident"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphed_one_token_step_equals_eager(mode, dtype) -> None:
    """The one-token step replayed as CUDA graphs (step_graphs.py: per layer and weight slot, per attention
    length) gives the eager step's tokens, across more than one attention length."""
    resident = {"max_resident_layers": None} if mode == "resident" else {}
    graphed = gpu_engine(mode, dtype=dtype, cuda_graphs=True, **resident)
    eager = gpu_engine(mode, dtype=dtype, cuda_graphs=False, **resident)
    try:
        assert graphed.step_graphs is not None and graphed.step_graphs.captured and eager.step_graphs is None
        prompt_length = len(_prompt(graphed))
        tokens = 300
        assert graphed.step_graphs.bucket(prompt_length) != graphed.step_graphs.bucket(prompt_length + tokens - 1), \
            "the run must replay more than one attention length's graphs"
        got, expected = _greedy(graphed, tokens), _greedy(eager, tokens)
        if dtype == "float32":
            assert got == expected
        else:  # bf16: the graphed step attends with the masked kernel, the eager one with flash: near-ties may part
            common = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(got))
            assert common >= 32, f"graphed and eager bf16 outputs part at token {common}"
    finally:
        graphed.close()
        eager.close()
