"""`Engine.generate(..., cancelled=...)`: an abort inside a step stops the engine within one draft level or
one target layer, the generator just returns, and the next request runs as if nothing had happened.

Every unit of engine work (a target decoder layer, a draft forward) and every cancel check is written to one
trace, so each test counts exactly what the engine did after its check first answered True.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from subspec_core.config import SpeculationConfig
from subspec_core.engine import Engine
from subspec_core.types import GenerationRequest, SamplingParams
from tests.core.tiny import tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROMPT = tuple(range(5, 45))  # 40 tokens: three prefill chunks of 16
LAYERS = 3


@pytest.fixture(scope="module")
def engine(tiny_tokenizer) -> Engine:
    # Every layer streamed through the ring (the paper's setting): an interrupted forward must reset it.
    return tiny_engine(tiny_hf_model("llama", num_layers=LAYERS), tiny_tokenizer, max_resident_layers=0,
                       speculation=SpeculationConfig(topk=3, max_depth=8))


class Trace:
    """Records ('layer', i), ('draft',) and ('check', answer) in order while spying on a real engine.

    The abort "arrives" as soon as `stop_when(trace)` holds after a unit of work has started; from then on
    `cancelled()` answers True. Units started after that moment are the work the abort failed to prevent.
    """

    def __init__(self, engine: Engine, stop_when: Callable[["Trace"], bool]) -> None:
        self.entries: list[tuple[Any, ...]] = []
        self.aborted_at: int | None = None  # len(entries) when the abort arrived
        self._stop_when = stop_when
        self._engine = engine
        layers = engine.target_layers
        self._acquire, self._draft = layers.acquire, engine.drafter.draft_logits
        layers.acquire = self._spy_acquire  # instance attributes shadow the methods for this test only
        engine.drafter.draft_logits = self._spy_draft

    def _work(self, entry: tuple[Any, ...]) -> None:
        self.entries.append(entry)
        if self.aborted_at is None and self._stop_when(self):
            self.aborted_at = len(self.entries)

    def _spy_acquire(self, layer: int, *args: Any) -> Any:
        self._work(("layer", layer))
        return self._acquire(layer, *args)

    def _spy_draft(self, *args: Any) -> Any:
        self._work(("draft",))
        return self._draft(*args)

    def cancelled(self) -> bool:
        answer = self.aborted_at is not None
        self.entries.append(("check", answer))
        return answer

    def count(self, kind: str) -> int:
        return sum(1 for entry in self.entries if entry[0] == kind)

    def work_after_cancel(self) -> list[tuple[Any, ...]]:
        assert self.aborted_at is not None, "the abort never arrived"
        return [entry for entry in self.entries[self.aborted_at:] if entry[0] != "check"]

    def restore(self) -> None:
        del self._engine.target_layers.acquire
        self._engine.drafter.draft_logits = self._draft


def run(engine: Engine, prompt: tuple[int, ...], stop_when: Callable[[Trace], bool], max_tokens: int = 40,
        *, aborted_from_start: bool = False):
    trace = Trace(engine, stop_when)
    if aborted_from_start:
        trace.aborted_at = 0
    try:
        request = GenerationRequest("r", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        events = list(engine.generate(request, cancelled=trace.cancelled))  # no exception may leak
    finally:
        trace.restore()
    return events, trace


def greedy_ids(engine: Engine, prompt: tuple[int, ...], max_tokens: int = 24) -> list[int]:
    request = GenerationRequest("g", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [t for event in engine.generate(request) for t in event.token_ids]


def test_never_cancelled_changes_nothing(engine):
    expected = greedy_ids(engine, PROMPT)
    events, trace = run(engine, PROMPT, lambda t: False, max_tokens=24)
    assert [t for e in events for t in e.token_ids] == expected and events[-1].finished
    # Asked before every target layer and every draft forward, nothing more.
    assert trace.count("check") == trace.count("layer") + trace.count("draft")


@pytest.mark.parametrize("where, stop_when", [
    # mid-prefill: after the first 16-token chunk went through one layer of the second chunk
    ("prefill", lambda t: t.count("layer") >= LAYERS + 1),
    # mid-draft: at the third draft level of the second speculative iteration (drafting starts after prefill)
    ("draft", lambda t: t.count("draft") >= 8 + 3),
    # mid-verify: between layers 1 and 2 of the first verification forward (prefill: 3 chunks x 3 layers)
    ("verify", lambda t: t.count("layer") >= 3 * LAYERS + 1 and t.count("draft") >= 8),
])
def test_cancel_stops_within_one_level_or_layer(engine, where, stop_when):
    expected = greedy_ids(engine, PROMPT)
    events, trace = run(engine, PROMPT, stop_when)
    assert trace.work_after_cancel() == []  # not one more layer, not one more draft level
    assert not any(event.finished for event in events)  # returned without a final event
    # The interrupted forward left the streaming ring consistent: the next request is exactly as before.
    assert greedy_ids(engine, PROMPT) == expected
    assert greedy_ids(engine, PROMPT[:7]) == greedy_ids(engine, PROMPT[:7])


def test_cancelled_before_it_starts_yields_nothing(engine):
    events, trace = run(engine, PROMPT, lambda t: False, aborted_from_start=True)
    assert events == [] and trace.entries == [("check", True)]
