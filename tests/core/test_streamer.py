"""The layer streamer (subspec_core/offload.py) on the CPU: the same control flow as on CUDA, plain tensors."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from subspec_core.config import SpeculationConfig
from subspec_core.offload import HostLayerStore, LayerStreamer, TargetLayers, place_layers, release_ring
from subspec_core.weights import LayerLayout, ModelShape
from tests.core.tiny import generate_ids, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")
SHAPE = ModelShape(
    architecture="qwen2", num_layers=5, hidden_size=8, intermediate_size=12, num_heads=2, num_kv_heads=1, head_dim=4,
    vocab_size=16, rms_norm_eps=1e-6, qkv_bias=True, o_bias=False, tie_embeddings=False,
)
LAYOUT = LayerLayout.for_shape(SHAPE)


def layer_tensors(layer: int) -> dict[str, torch.Tensor]:
    """Distinctive weights for one layer: every element encodes (layer, tensor, index)."""
    out = {}
    for k, (name, _, dims) in enumerate(LAYOUT.entries):
        numel = torch.Size(dims).numel()
        out[name] = (layer * 1000 + k * 100 + torch.arange(numel, dtype=torch.float32) / numel).view(dims)
    return out


def fill_layer(layer: int, out: dict[str, torch.Tensor]) -> None:
    """A weights.LayerFiller over `layer_tensors`."""
    tensors = layer_tensors(layer)
    for name, view in out.items():
        view.copy_(tensors[name])


def make_store(layer_ids: list[int]) -> HostLayerStore:
    store = HostLayerStore(layout=LAYOUT, layer_ids=layer_ids, dtype=torch.float32, pin=False)
    for layer in layer_ids:
        fill_layer(layer, LAYOUT.views(store.layer(layer)))
    return store


def assert_is_layer(weights: dict[str, torch.Tensor], layer: int) -> None:
    expected = layer_tensors(layer)
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), f"{name} of layer {layer}"


def slot_bytes() -> int:
    return LAYOUT.numel * 4


@pytest.mark.parametrize("num_slots", [2, 3])
@pytest.mark.parametrize("layer_ids", [[1, 3, 4], [0, 1, 2, 3, 4], [2]], ids=["three", "five", "one"])
def test_acquire_returns_the_right_layer_over_consecutive_cycles(num_slots, layer_ids):
    store = make_store(layer_ids)
    streamer = LayerStreamer(store=store, device=CPU, num_slots=num_slots)
    assert len(streamer.slots) == num_slots
    for _cycle in range(4):
        for layer in layer_ids:
            weights = streamer.acquire(layer)
            assert_is_layer(weights, layer)
            streamer.release(layer)


def test_acquired_weights_stay_valid_until_release():
    store = make_store([0, 1, 2])
    streamer = LayerStreamer(store=store, device=CPU, num_slots=2)
    for _ in range(3):
        for layer in (0, 1, 2):
            weights = streamer.acquire(layer)
            snapshot = {k: v.clone() for k, v in weights.items()}
            assert_is_layer(weights, layer)
            assert all(torch.equal(weights[k], snapshot[k]) for k in weights)  # nothing overwrote the slot
            streamer.release(layer)


def test_wrong_order_raises_and_leaves_the_cycle_intact():
    streamer = LayerStreamer(store=make_store([1, 3, 4]), device=CPU, num_slots=2)
    with pytest.raises(RuntimeError, match="asked for 3, next is 1"):
        streamer.acquire(3)
    assert_is_layer(streamer.acquire(1), 1)
    streamer.release(1)
    with pytest.raises(RuntimeError, match="in order"):
        streamer.acquire(4)
    with pytest.raises(RuntimeError):
        streamer.acquire(1)
    assert_is_layer(streamer.acquire(3), 3)


def test_needs_two_slots():
    with pytest.raises(ValueError, match="two slots"):
        LayerStreamer(store=make_store([0, 1]), device=CPU, num_slots=1)


@pytest.mark.parametrize("num_slots", [2, 3])
@pytest.mark.parametrize("stop_after", range(6))
def test_reset_recovers_after_an_interrupted_cycle(num_slots, stop_after):
    # A forward runs `stop_after` layer steps (the last possibly acquired but never released), then dies.
    layer_ids = [0, 2, 3, 4]
    streamer = LayerStreamer(store=make_store(layer_ids), device=CPU, num_slots=num_slots)
    for _ in range(2):  # a complete forward first
        for layer in layer_ids:
            streamer.acquire(layer)
            streamer.release(layer)
    steps = [layer_ids[i % 4] for i in range(stop_after)]
    for i, layer in enumerate(steps):
        streamer.acquire(layer)
        if i < len(steps) - 1 or stop_after % 2 == 0:  # sometimes die holding the slot
            streamer.release(layer)
    streamer.reset()
    for _ in range(3):
        for layer in layer_ids:
            assert_is_layer(streamer.acquire(layer), layer)
            streamer.release(layer)


def test_h2d_bytes_counts_every_copy():
    streamer = LayerStreamer(store=make_store([0, 1, 2]), device=CPU, num_slots=2)
    assert streamer.h2d_bytes == 2 * slot_bytes()  # the ring is primed with the first two layers
    for layer in (0, 1, 2):
        streamer.acquire(layer)
        streamer.release(layer)  # each release refills its slot with the layer two steps ahead
    assert streamer.h2d_bytes == 5 * slot_bytes()
    streamer.acquire(0)
    assert streamer.h2d_bytes == 5 * slot_bytes()  # acquiring copies nothing
    streamer.reset()  # re-primes both slots
    assert streamer.h2d_bytes == 7 * slot_bytes()
    for _ in range(10):
        for layer in (0, 1, 2):
            streamer.acquire(layer)
            streamer.release(layer)
    assert streamer.h2d_bytes == 37 * slot_bytes()  # per forward: exactly one copy per streamed layer


def test_host_store_packs_layers_contiguously():
    store = make_store([1, 3])
    assert store.arena.numel() == 2 * LAYOUT.numel
    assert not store.pinned
    assert_is_layer(LAYOUT.views(store.layer(3)), 3)
    assert store.layer(3).data_ptr() == store.arena[LAYOUT.numel :].data_ptr()
    with pytest.raises(KeyError):
        store.layer(0)


def forward_outputs(layers: TargetLayers, x: torch.Tensor) -> list[torch.Tensor]:
    """Apply each layer's four linears in order (acquire/release around each), as forward_hidden does."""
    outs = []
    for i in range(SHAPE.num_layers):
        lin = layers.acquire(i)
        outs.append(torch.cat([lin.qkv(x), lin.o(x[:, : SHAPE.q_size]), lin.gate_up(x), lin.down(torch.ones(x.shape[0], SHAPE.intermediate_size))], dim=-1))
        layers.release(i)
    return outs


def expected_outputs(x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for i in range(SHAPE.num_layers):
        w = layer_tensors(i)
        outs.append(torch.cat([
            F.linear(x, w["qkv_weight"], w["qkv_bias"]), F.linear(x[:, : SHAPE.q_size], w["o_weight"]),
            F.linear(x, w["gate_up_weight"]), F.linear(torch.ones(x.shape[0], SHAPE.intermediate_size), w["down_weight"]),
        ], dim=-1))
    return outs


@pytest.mark.parametrize("resident_ids", [[0, 2], [], [0, 1, 2, 3, 4], [4], [1, 2, 3]])
def test_target_layers_mix_resident_and_streamed(resident_ids):
    layers = place_layers(
        fill_layer=fill_layer, num_layers=SHAPE.num_layers,
        layout=LAYOUT, dtype=torch.float32, resident_ids=resident_ids, device=CPU, num_slots=2, progress=False,
    )
    streamed = [i for i in range(SHAPE.num_layers) if i not in resident_ids]
    assert sorted(layers.resident) == sorted(resident_ids)
    if streamed:
        assert layers.streamer is not None and layers.streamer.order == tuple(streamed)
    else:
        assert layers.streamer is None and layers.h2d_bytes == 0
    x = torch.randn(3, SHAPE.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = expected_outputs(x)
    start = layers.h2d_bytes
    for _ in range(3):  # consecutive forwards
        for got, want in zip(forward_outputs(layers, x), expected):
            assert torch.allclose(got, want)
    assert layers.h2d_bytes - start == 3 * len(streamed) * slot_bytes()  # only streamed layers are copied


def test_engine_output_is_independent_of_placement_and_survives_an_interrupted_forward(tiny_tokenizer):
    model = tiny_hf_model("llama", num_layers=4)
    speculation = SpeculationConfig(topk=2, max_depth=3)
    reference, _ = generate_ids(tiny_engine(model, tiny_tokenizer, mode="resident", max_resident_layers=None), [3, 1, 4, 1, 5], max_tokens=12, temperature=0.0)
    for resident in (0, 1, 3):
        engine = tiny_engine(model, tiny_tokenizer, mode="vanilla", max_resident_layers=resident, speculation=speculation)
        ids, stats = generate_ids(engine, [3, 1, 4, 1, 5], max_tokens=12, temperature=0.0)
        assert ids == reference, f"{resident} resident layers"
        assert stats.h2d_bytes > 0

    # A target forward that dies inside a streamed layer: the engine resets the ring, the next request is right.
    engine = tiny_engine(model, tiny_tokenizer, mode="subspec", max_resident_layers=1, speculation=speculation)
    target = engine.target_layers
    original_acquire = target.acquire
    calls = {"n": 0}

    def failing_acquire(layer: int):
        calls["n"] += 1
        if calls["n"] == 7:  # the second forward (the first verification), layer 2: streamed
            raise RuntimeError("boom")
        return original_acquire(layer)

    target.acquire = failing_acquire  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        generate_ids(engine, [3, 1, 4, 1, 5], max_tokens=12, temperature=0.0)
    target.acquire = original_acquire  # type: ignore[method-assign]
    ids, _ = generate_ids(engine, [3, 1, 4, 1, 5], max_tokens=12, temperature=0.0)
    assert ids == reference


class RecordingStore(HostLayerStore):
    """A host store whose unregistering is recorded, with how many ring buffers were still held at that moment."""

    def __init__(self, calls: list, held: list) -> None:
        super().__init__(layout=LAYOUT, layer_ids=[1, 3], dtype=torch.float32)
        self.calls, self.held = calls, held

    def close(self) -> None:
        self.calls.append(("unregister", len(self.held)))
        super().close()


class RecordingCopies:
    """Stands in for the copy engine (a CUDA stream and its events) on the CPU."""

    def __init__(self, calls: list, held: list) -> None:
        self.calls, self.held = calls, held

    def close(self) -> None:
        self.calls.append(("wait", len(self.held)))


def test_ring_teardown_waits_then_frees_then_unregisters():
    calls: list = []
    slots, views = [torch.zeros(4), torch.zeros(4)], [{}, {}]
    release_ring(copies=RecordingCopies(calls, slots), buffers=[slots, views], store=RecordingStore(calls, slots))
    assert calls == [("wait", 2), ("unregister", 0)]  # copies finished while both buffers lived; freed before unregister
    assert slots == [] and views == []


def test_close_is_idempotent_and_a_dropped_streamer_tears_down_too():
    for close in (True, False):
        calls: list = []
        store = RecordingStore(calls, [])
        streamer = LayerStreamer(store=store, device=CPU, num_slots=2)
        store.held = slots = streamer.slots
        assert len(slots) == 2
        if close:
            streamer.close()
            streamer.close()
        else:
            del streamer  # dropped without close(): its finalizer runs the same teardown
            gc.collect()
        assert calls == [("unregister", 0)] and slots == [], close  # once, the ring already freed


def test_engine_close_frees_the_ring_once(tiny_tokenizer):
    engine = tiny_engine(tiny_hf_model("llama", num_layers=2), tiny_tokenizer, mode="vanilla")
    streamer = engine.target_layers.streamer
    assert len(streamer.slots) == 2
    engine.close()
    engine.close()
    assert streamer.slots == [] and streamer.slot_views == []
