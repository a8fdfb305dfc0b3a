"""The simulated link (subspec_core/copies.py): its ordering under random delays, and the ring and engine over it.

A slot is never read before its copy landed and never overwritten while it is read: checked with copies issued
far ahead of the reader (so only the link's waits stand between them), and shown able to fail by a link
whose wait is removed.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from subspec_core.config import EngineConfig
from subspec_core.copies import SimulatedLink, make_copies
from subspec_core.offload import LayerStreamer
from tests.core.test_streamer import assert_is_layer, make_store, slot_bytes
from tests.core.tiny import generate_ids, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")


class SkippingLink(SimulatedLink):
    """A broken link: acquire does not wait for the copy."""

    def wait_filled(self, *, seq, slot, while_waiting=None):  # noqa: ANN001, ANN201
        pass


def read_through_ring(link: SimulatedLink, *, num_slots: int, count: int) -> list[str]:
    """Issue `count` copies at once (far ahead of the reader), then read them in order with delays; the
    errors seen: a slot read before its copy landed, or overwritten while read."""
    sources = [torch.full((4096,), float(k)) for k in range(count)]
    slots = [torch.full((4096,), -1.0) for _ in range(num_slots)]
    for k in range(count):
        link.copy(seq=k, slot=k % num_slots, dest=slots[k % num_slots], source=sources[k])
    errors = []
    for k in range(count):
        slot = slots[k % num_slots]
        link.wait_filled(seq=k, slot=k % num_slots)
        if not torch.equal(slot, sources[k]):
            errors.append(f"read {k} before its copy")
        threading.Event().wait(0.0005 * (k % 3))  # the reader holds the slot a while
        if not torch.equal(slot, sources[k]):
            errors.append(f"{k} overwritten while read")
        link.mark_free(seq=k, slot=k % num_slots)
    link.drain()
    link.close()
    return errors


@pytest.mark.parametrize("num_slots", [2, 3])
def test_a_slot_is_never_read_before_filled_nor_overwritten_while_read(num_slots):
    link = SimulatedLink(num_slots=num_slots, gbps=0.05, jitter_s=0.002, seed=num_slots)  # ~0.3 ms a copy
    assert read_through_ring(link, num_slots=num_slots, count=40) == []


def test_the_ordering_check_catches_a_missing_wait():
    errors = read_through_ring(SkippingLink(num_slots=2, gbps=0.05, jitter_s=0.002), num_slots=2, count=20)
    assert any("before its copy" in e for e in errors)


def test_copies_take_the_link_time():
    link = SimulatedLink(num_slots=2, gbps=0.1)
    dest, source = torch.zeros(250_000), torch.ones(250_000)  # 1 MB: 10 ms at 0.1 GB/s
    begin = time.perf_counter()
    link.copy(seq=0, slot=0, dest=dest, source=source)
    link.wait_filled(seq=0, slot=0)
    assert time.perf_counter() - begin >= 0.01 and torch.equal(dest, source)
    link.close()


def test_the_ring_over_the_link_streams_every_layer_right_and_recovers_from_an_interruption():
    layer_ids = [0, 2, 3, 4]
    link = SimulatedLink(num_slots=2, gbps=1.0, jitter_s=0.001, seed=3)
    streamer = LayerStreamer(store=make_store(layer_ids), device=CPU, num_slots=2, copies=link)
    for _ in range(3):
        for layer in layer_ids:
            assert_is_layer(streamer.acquire(layer), layer)
            streamer.release(layer)
    streamer.acquire(0)  # a forward dies holding layer 0's slot, layer 2's copy in flight
    streamer.reset()
    for layer in layer_ids:
        assert_is_layer(streamer.acquire(layer), layer)
        streamer.release(layer)
    assert streamer.h2d_bytes == (2 + 12 + 2 + 4) * slot_bytes()  # primed, 3 cycles, re-primed, 1 cycle
    streamer.close()
    assert streamer.slots == [] and not link._thread.is_alive()  # waited, freed, thread stopped


def test_the_link_is_a_cpu_option():
    with pytest.raises(ValueError, match="CPU aid"):
        EngineConfig(device="cuda", simulate_link_gbps=1.0)
    with pytest.raises(ValueError, match="needs simulate_link_gbps"):
        EngineConfig(simulate_link_jitter_s=0.1)
    with pytest.raises(ValueError, match="on a GPU"):
        make_copies(device=torch.device("cuda", 0), num_slots=2, simulate_link_gbps=1.0)


def test_a_missing_wait_shows_up_as_wrong_tokens(tiny_tokenizer, monkeypatch):
    """The engine over a link that skips acquire's wait reads stale layers: its output changes."""
    model = tiny_hf_model("llama")
    expected, _ = generate_ids(tiny_engine(model, tiny_tokenizer, mode="vanilla"), [3, 1, 4], max_tokens=8, temperature=0)
    monkeypatch.setattr(SimulatedLink, "wait_filled", SkippingLink.wait_filled)
    broken = tiny_engine(model, tiny_tokenizer, mode="vanilla", simulate_link_gbps=0.02, simulate_link_jitter_s=0.002)
    got, _ = generate_ids(broken, [3, 1, 4], max_tokens=8, temperature=0)
    broken.close()
    assert got != expected
