"""careservice.wakeup.Gate: waiters go on together, in one turn of the loop, once all expected wait or the
linger is over; one that leaves or is cancelled holds up no one. The outbox's connections record their
deliveries through one: one transaction per round of them, against a real relay and store."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from careservice import outbox as outbox_module
from careservice.model import MailKind
from careservice.outbox import Outbox
from careservice.outbox import Relay
from careservice.store import Store
from careservice.wakeup import Gate
from tests.support import CaptureRelay
from tests.test_outbox import BUDGET
from tests.test_outbox import Clock
from tests.test_outbox import notice_for
from tests.test_outbox import queue_mail
from tests.test_outbox import relay_config
from tests.test_outbox import store  # noqa: F401 (the fixture)


async def _turns_of(gate: Gate, waiters: int, before: list[int] | None = None) -> list[int]:
    """The loop turn (counted by a ticker task) in which each of `waiters` tasks got through the gate."""
    turn = 0
    passed: list[int] = []

    async def tick() -> None:
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    async def wait(delay_turns: int) -> None:
        for _ in range(delay_turns):
            await asyncio.sleep(0)
        await gate.passage()
        passed.append(turn)

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.wait_for(asyncio.gather(*(wait(d) for d in (before or [0] * waiters))), 10)
    finally:
        ticker.cancel()
    return passed


async def test_all_expected_go_on_in_one_turn_without_waiting_for_the_linger() -> None:
    gate = Gate(4, linger=60)
    passed = await _turns_of(gate, 4, before=[0, 3, 1, 7])  # they arrive in different turns
    assert len(passed) == 4 and len(set(passed)) == 1


async def test_fewer_than_expected_go_on_together_after_the_linger() -> None:
    gate = Gate(4, linger=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    passed = await _turns_of(gate, 2)
    assert loop.time() - started >= 0.05
    assert len(passed) == 2 and len(set(passed)) == 1


async def test_one_that_leaves_holds_up_no_one() -> None:
    gate = Gate(3, linger=60)
    waiting = [asyncio.create_task(gate.passage()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    gate.leave()
    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert gate.expected == 2


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    gate = Gate(3, linger=60)
    first, second = asyncio.create_task(gate.passage()), asyncio.create_task(gate.passage())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    await gate.passage()  # the third: the gate counts the cancelled one as having come
    await asyncio.wait_for(second, 10)
    with pytest.raises(asyncio.CancelledError):
        await first


@pytest.mark.parametrize(("mails", "per_commit"), [(8, [4, 4]), (7, [4, 3])])
async def test_the_connections_deliveries_are_recorded_together(store: Store, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                                mails: int, per_commit: list[int]) -> None:
    """Four connections, two mails each (one of them only one: it leaves the gate, and the others do not
    wait for it); each round of deliveries is one transaction, before any connection's next mail."""
    monkeypatch.setattr(outbox_module, "RECORD_LINGER", 60.0)  # grouped by who has come, not by timing
    relay = CaptureRelay().start()
    config = replace(relay_config(relay.port), connections=4)
    clock = Clock()
    await queue_mail(store, MailKind.ACK, mails, clock.now)
    outbox = Outbox(config, store, Relay(config, ""), clock, notice_for, BUDGET.mail)
    statements: list[str] = []
    store.executor.conn.set_trace_callback(statements.append)  # type: ignore[union-attr]
    try:
        assert await asyncio.wait_for(outbox.deliver_due(), 30) == mails
    finally:
        store.executor.conn.set_trace_callback(None)  # type: ignore[union-attr]
        await outbox.relay.close_idle(0)
        relay.stop()
    transactions = "\n".join(statements).split("BEGIN")
    assert [t.count("DELETE FROM outbox") for t in transactions if "DELETE FROM outbox" in t] == per_commit
    assert len(relay.received) == mails
