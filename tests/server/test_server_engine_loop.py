"""The worker's request loop against a fake engine: order, aborts, errors, shutdown."""

from __future__ import annotations

import time

from server.worker import ipc
from tests.server.loop_harness import Harness, request
from tests.server.server_fakes import FakeEngine, render_reply


def texts(messages, rid):
    return "".join(m.event.text for m in messages if isinstance(m, ipc.Event) and m.event.request_id == rid)


def test_requests_run_in_submission_order():
    h = Harness(FakeEngine())
    for rid in ("a", "b", "c"):
        h.inbox.put(ipc.Submit(request(rid)))
    messages = h.until_done("c")
    assert h.engine.served == ["a", "b", "c"]
    expected, reason = render_reply(12)
    assert texts(messages, "b") == expected
    finals = [m.event for m in messages if isinstance(m, ipc.Event) and m.event.finished]
    assert [e.finish_reason for e in finals] == [reason] * 3 and all(e.stats is not None for e in finals)
    h.shutdown()


def test_abort_stops_the_running_request_within_one_iteration_and_drops_queued_ones():
    h = Harness(FakeEngine(delay_s=0.05, chars_per_event=1))
    h.inbox.put(ipc.Submit(request("long", max_tokens=200, ignore_eos=True)))
    h.inbox.put(ipc.Submit(request("queued")))
    h.inbox.put(ipc.Submit(request("next")))
    first = h.outbox.get(timeout=10)
    assert isinstance(first, ipc.Event) and first.event.request_id == "long"
    h.inbox.put(ipc.Abort("queued"))
    h.inbox.put(ipc.Abort("long"))
    messages = h.until_done("next")
    long_events = [m for m in messages if isinstance(m, ipc.Event) and m.event.request_id == "long"]
    assert len(long_events) <= 2  # the abort is seen between iterations
    assert h.engine.served == ["long", "next"] and h.engine.closed_early == ["long"]
    assert any(isinstance(m, ipc.Done) and m.request_id == "queued" for m in messages)
    h.shutdown()


def test_value_error_is_a_400_and_the_loop_carries_on():
    h = Harness(FakeEngine())
    h.inbox.put(ipc.Submit(request("bad", "RAISE_VALUE")))
    h.inbox.put(ipc.Submit(request("broken", "RAISE_RUNTIME")))
    h.inbox.put(ipc.Submit(request("good")))
    messages = h.until_done("good")
    errors = {m.request_id: m for m in messages if isinstance(m, ipc.Error)}
    assert errors["bad"].status_code == 400 and errors["bad"].error_type == "invalid_request_error"
    assert errors["broken"].status_code == 500 and "fake engine broke" in errors["broken"].message
    assert texts(messages, "good") == render_reply(12)[0]
    h.shutdown()


def test_shutdown_stops_a_running_request():
    h = Harness(FakeEngine(delay_s=0.05, chars_per_event=1))
    h.inbox.put(ipc.Submit(request("long", max_tokens=200, ignore_eos=True)))
    h.outbox.get(timeout=10)
    h.shutdown()
    assert h.engine.closed_early == ["long"]


def test_heartbeats_flow_while_the_engine_is_inside_a_long_step():
    """One 2.5 s iteration (50 levels): the API process hears from the worker about every second anyway."""
    h = Harness(FakeEngine(delay_s=2.5, levels_per_event=50, chars_per_event=1))
    h.inbox.put(ipc.Submit(request("slow", max_tokens=1)))
    messages = h.until_done("slow")
    beats = [m for m in messages if isinstance(m, ipc.Heartbeat)]
    assert len(beats) >= 2 and all(b.request_id == "slow" for b in beats)
    assert messages.index(beats[0]) < next(i for i, m in enumerate(messages) if isinstance(m, ipc.Event))
    h.shutdown()


def test_noticed_abort_stops_the_running_request_inside_its_step():
    """`notice` (called by whoever reads the channel, as the worker's reader thread does) sets the running
    request's cancel flag at once: the engine stops at its next level, not at the end of the iteration."""
    engine = FakeEngine(delay_s=2.0, levels_per_event=40, chars_per_event=1)  # 50 ms levels, 2 s iterations
    h = Harness(engine)
    h.inbox.put(ipc.Submit(request("long", max_tokens=50, ignore_eos=True)))
    h.inbox.put(ipc.Submit(request("next", max_tokens=1)))
    time.sleep(0.3)  # ~6 levels into the first iteration, no event yet
    h.loop.notice(ipc.Abort("long"))
    h.inbox.put(ipc.Abort("long"))
    started = time.monotonic()
    messages = h.until_done("long")
    assert time.monotonic() - started < 0.5  # one 50 ms level, not the 1.7 s left of the iteration
    assert not [m for m in messages if isinstance(m, ipc.Event)] and engine.closed_early == ["long"]
    h.until_done("next")
    h.shutdown()
