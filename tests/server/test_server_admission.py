"""The admission queue: FIFO order, bounded waiting, cancellation and release semantics."""

from __future__ import annotations

import asyncio

import pytest

from server.worker.admission import Admission, AdmissionClosed, QueueFull

pytestmark = pytest.mark.anyio


async def test_first_request_runs_at_once_others_wait_in_order():
    admission = Admission(max_waiting=3)
    tickets = [admission.reserve(f"r{i}") for i in range(4)]
    assert tickets[0].holds_slot and admission.running == 1 and admission.waiting == 3
    with pytest.raises(QueueFull):
        admission.reserve("r4")
    order: list[str] = []

    async def run(ticket):
        await ticket.wait_turn()
        order.append(ticket.request_id)
        await asyncio.sleep(0.01)
        ticket.release()

    await asyncio.gather(*(run(t) for t in reversed(tickets)))
    assert order == ["r0", "r1", "r2", "r3"]
    assert admission.running == 0 and admission.waiting == 0


async def test_zero_waiting_allows_only_the_running_request():
    admission = Admission(max_waiting=0)
    first = admission.reserve("a")
    with pytest.raises(QueueFull):
        admission.reserve("b")
    first.release()
    admission.reserve("c").release()


async def test_cancelled_waiter_gives_up_its_place():
    admission = Admission(max_waiting=2)
    running = admission.reserve("a")
    waiter = admission.reserve("b")
    last = admission.reserve("c")
    task = asyncio.ensure_future(waiter.wait_turn())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert admission.waiting == 1
    running.release()
    await asyncio.wait_for(last.wait_turn(), 1)
    assert last.holds_slot


async def test_release_is_idempotent_in_any_state():
    admission = Admission(max_waiting=2)
    a, b, c = (admission.reserve(x) for x in "abc")
    b.release()  # waiting -> gone
    b.release()
    a.release()  # running -> next waiter (c)
    a.release()
    assert c.holds_slot and admission.waiting == 0
    c.release()
    assert admission.running == 0


async def test_close_ends_the_waiters_keeps_the_running_one_and_refuses_new_requests():
    admission = Admission(max_waiting=3)
    running, first, second = (admission.reserve(x) for x in "abc")
    waits = [asyncio.ensure_future(t.wait_turn()) for t in (first, second)]
    await asyncio.sleep(0)
    assert admission.close() == 2
    for wait in waits:
        with pytest.raises(AdmissionClosed):
            await wait
    assert running.holds_slot and admission.waiting == 0
    with pytest.raises(AdmissionClosed):
        admission.reserve("d")
    idle = asyncio.ensure_future(admission.wait_idle())
    await asyncio.sleep(0.01)
    assert not idle.done()
    first.release()  # already ended: a no-op
    running.release()
    await asyncio.wait_for(idle, 1)


async def test_several_slots_run_that_many_requests_and_queue_the_rest_in_order():
    """max_num_seqs slots: the first `slots` requests run at once, the next wait (429 past max_waiting), and each
    released slot goes to the oldest waiter."""
    admission = Admission(max_waiting=2, slots=3)
    tickets = [admission.reserve(f"r{i}") for i in range(5)]
    assert [t.holds_slot for t in tickets] == [True, True, True, False, False]
    assert admission.running == 3 and admission.waiting == 2
    with pytest.raises(QueueFull):
        admission.reserve("r5")
    tickets[1].release()
    assert tickets[3].holds_slot and not tickets[4].holds_slot and admission.running == 3
    tickets[4].release()  # a waiter giving up its place frees no slot
    assert admission.running == 3 and admission.waiting == 0
    for ticket in tickets:
        ticket.release()
    assert admission.running == 0
    await asyncio.wait_for(admission.wait_idle(), 1)
    with pytest.raises(ValueError):
        Admission(max_waiting=1, slots=0)


async def test_resizing_grants_waiters_new_slots_and_a_smaller_count_lets_running_requests_finish():
    """The worker's count arrives after requests may have queued behind the one slot the API starts with."""
    admission = Admission(max_waiting=4)
    tickets = [admission.reserve(f"r{i}") for i in range(4)]
    assert [t.holds_slot for t in tickets] == [True, False, False, False]
    admission.resize(3)  # the ready worker decodes three at once: the two oldest waiters start now
    assert [t.holds_slot for t in tickets] == [True, True, True, False]
    admission.resize(1)  # a replacement worker with one: nobody is stopped, nobody new starts until under it
    tickets[0].release()
    tickets[1].release()
    assert not tickets[3].holds_slot and admission.running == 1
    tickets[2].release()
    assert tickets[3].holds_slot and admission.running == 1
    tickets[3].release()
    await asyncio.wait_for(admission.wait_idle(), 1)
    with pytest.raises(ValueError):
        admission.resize(0)
