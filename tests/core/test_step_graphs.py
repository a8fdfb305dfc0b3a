"""The graphed one-token step (subspec_core/step_graphs.py), imitated on the CPU: each "graph" replays the eager
function its capture would record, over the same persistent buffers, so the step's buffer handoffs, bucket
choice, masked attention over the bucket and (layer, ring slot) keys run as they will on a GPU. The outputs
must be plain decoding's, and every pair the ring hands out must have a captured graph."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from subspec_core.step_graphs import StepGraphs
from tests.core.tiny import generate_ids, tiny_engine, tiny_hf_model


class Recorded:
    """A captured graph's stand-in: replay runs the function the capture traced."""

    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step

    def replay(self) -> None:
        self.step()


class Captured(dict):
    """The layer graphs, noting every key asked for that no capture made (the step would run it eagerly)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.missed: list[tuple[int, int, int]] = []

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self.missed.append(key)
        return super().get(key, default)


def imitate_capture(graphs: StepGraphs) -> None:
    graphs.head = {length: Recorded(lambda length=length: graphs._head_step(length)) for length in graphs.lengths}
    graphs.layer = Captured({
        graphs._key(layer, linears, length): Recorded(
            lambda layer=layer, linears=linears, length=length: graphs._layer_step(layer, linears, length))
        for length in graphs.lengths for layer, linears in graphs._weights()
    })


@pytest.mark.parametrize("resident, pairs", [(0, 6), (1, 2)], ids=["3 streamed over 2 slots", "2 streamed, 2 slots"])
def test_the_graphed_step_equals_the_eager_one_and_every_pair_the_ring_hands_out_is_captured(
        tiny_tokenizer, resident, pairs):
    model = tiny_hf_model("llama", seed=3)
    eager = tiny_engine(model, tiny_tokenizer, mode="vanilla", max_model_len=320, max_resident_layers=resident)
    graphed = tiny_engine(model, tiny_tokenizer, mode="vanilla", max_model_len=320, max_resident_layers=resident)
    with torch.inference_mode():
        graphs = StepGraphs(shape=graphed.shape, shared=graphed.shared, kv_cache=graphed.kv_cache,
                            layers=graphed.target_layers, backend=None, device=graphed.device)
    streamed = [(i, linears) for i, linears in graphs._weights() if i not in graphed.target_layers.resident]
    assert len(streamed) == pairs  # (layer, slot) pairs the ring's cycle reaches: lcm(streamed, slots) of them
    imitate_capture(graphs)
    graphed.step_graphs = graphs
    assert len(graphs.lengths) > 1
    for prompt in ([5, 9, 2], list(range(3, 300, 2))[:140]):  # the second crosses from one bucket into the next
        expected, _ = generate_ids(eager, prompt, max_tokens=140, temperature=0)
        got, _ = generate_ids(graphed, prompt, max_tokens=140, temperature=0)
        assert got == expected
    assert graphs.layer.missed == []
