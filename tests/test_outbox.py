"""The relay client against a real SMTP server on 127.0.0.1: kept connections, a dropped one, a hung
one; the outbox over a real store: back-off while the relay is down, and what it logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from careservice.budget import Budget
from careservice.config import RelayConfig
from careservice.crypto import Keyring
from careservice.model import CaseState
from careservice.model import DeliveryFailure
from careservice.model import Envelope
from careservice.model import MailEvent
from careservice.model import MailKind
from careservice.model import Outcome
from careservice.model import OutgoingMail
from careservice.model import Source
from careservice.outbox import Outbox
from careservice.outbox import Refusal
from careservice.outbox import Relay
from careservice.store import NewMessage
from careservice.store import QueuedMail
from careservice.store import Store
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import free_port

BUDGET = Budget.of(512)


@dataclass
class CountingRelay(CaptureRelay):
    """A CaptureRelay that counts the sessions that greeted it (one EHLO per connection)."""

    sessions: int = 0

    async def handle_EHLO(self, server: object, session: Session, envelope: object, hostname: str,
                          responses: list[str]) -> list[str]:
        self.sessions += 1
        session.host_name = hostname  # aiosmtpd leaves this to the hook
        return responses


@dataclass
class HangingRelay(CountingRelay):
    """A relay that stops answering the commands named in `hang` (stuck mid-session)."""

    hang: set[str] = field(default_factory=set)

    async def _maybe_hang(self, command: str) -> None:
        if command in self.hang:
            await asyncio.sleep(HANG_SECONDS)  # cancelled when the server stops

    async def handle_NOOP(self, server: object, session: Session, envelope: object, arg: str) -> str:
        await self._maybe_hang("NOOP")
        return "250 OK"

    async def handle_QUIT(self, server: object, session: Session, envelope: object) -> str:
        await self._maybe_hang("QUIT")
        return "221 Bye"


HANG_SECONDS = 120
RELAY_TIMEOUT = 60  # the relay's command timeout: a wait this long means the bound did not work


def relay_config(port: int, timeout: int = 10) -> RelayConfig:
    return RelayConfig(url=f"smtp://127.0.0.1:{port}", scheme="smtp", host="127.0.0.1", port=port, maildir=None,
                       retry_delays=(1,), give_up_after=60, username="", password_file="", timeout=timeout,
                       connections=1, ca_file="")


def queued(n: int) -> QueuedMail:
    message = f"From: care@ticketnest.test\r\nTo: c@customer.example\r\nSubject: {n}\r\n\r\nmail {n}\r\n".encode()
    return QueuedMail(n, "ticketnest", 0, 0.0, OutgoingMail(MailKind.ACK, "case", "", ("c@customer.example",),
                                                            message, f"{n}@ticketnest.test"))


async def send(relay: Relay, items: list[QueuedMail]) -> list[Refusal | None]:
    results: list[Refusal | None] = []

    async def record(item: QueuedMail, refusal: Refusal | None) -> None:
        results.append(refusal)

    await relay.send_all(items, record)
    return results


async def test_batches_share_one_kept_connection_until_it_idles() -> None:
    server = CountingRelay().start()
    try:
        relay = Relay(relay_config(server.port), "")
        for batch in range(3):
            assert await send(relay, [queued(2 * batch), queued(2 * batch + 1)]) == [None, None]
        assert server.sessions == 1 and len(server.received) == 6
        assert relay.keeps_connections
        await relay.close_idle(0)
        assert not relay.keeps_connections
        assert await send(relay, [queued(6)]) == [None]
        assert server.sessions == 2
        await relay.close_idle(0)
    finally:
        server.stop()


async def test_a_kept_connection_the_relay_dropped_is_replaced_without_losing_mail() -> None:
    server = CountingRelay().start()
    relay = Relay(relay_config(server.port), "")
    try:
        assert await send(relay, [queued(1)]) == [None]
        server.stop()  # the relay restarts: the kept connection is dead
        server = CountingRelay(port=server.port).start()
        assert await send(relay, [queued(2)]) == [None]
        assert [c.raw for c in server.received] == [queued(2).mail.message]
        assert server.sessions == 1
    finally:
        await relay.close_idle(0)
        server.stop()


async def test_a_connection_used_a_moment_ago_is_reused_without_a_noop() -> None:
    server = HangingRelay(hang={"NOOP"}).start()  # a NOOP would wait CHECK_SECONDS, then open a second session
    relay = Relay(relay_config(server.port, RELAY_TIMEOUT), "")
    try:
        for n in range(3):
            assert await send(relay, [queued(n)]) == [None]
        assert server.sessions == 1 and len(server.received) == 3
    finally:
        server.hang.clear()
        await relay.close_idle(0)
        server.stop()


async def test_a_relay_that_never_answers_quit_does_not_hold_up_closing() -> None:
    server = HangingRelay(hang={"QUIT"}).start()
    relay = Relay(relay_config(server.port, RELAY_TIMEOUT), "")
    try:
        assert await send(relay, [queued(1)]) == [None]
        started = time.monotonic()
        await relay.close_idle(0)
        assert time.monotonic() - started < RELAY_TIMEOUT / 2
        assert not relay.keeps_connections
    finally:
        server.stop()


async def test_a_kept_connection_that_stopped_answering_is_replaced() -> None:
    server = HangingRelay().start()
    relay = Relay(relay_config(server.port, RELAY_TIMEOUT), "")
    relay.TRUSTED_SECONDS = 0.0  # every reuse asks NOOP first
    try:
        assert await send(relay, [queued(1)]) == [None]
        server.hang.add("NOOP")  # the kept session is stuck; a new one still works
        started = time.monotonic()
        assert await send(relay, [queued(2)]) == [None]
        assert time.monotonic() - started < RELAY_TIMEOUT / 2
        assert [c.raw for c in server.received] == [queued(1).mail.message, queued(2).mail.message]
        assert server.sessions == 2
    finally:
        server.hang.clear()
        await relay.close_idle(0)
        server.stop()


CUSTOMER = "outbox.customer@customer.example"
RELAY_SERVER_LOG = "mail.log"  # aiosmtpd's: the test relay's own log, not the outbox's


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    """What every logger but the test relay's wrote at `level` or above."""
    return [f"{r.levelname} {r.name} {r.getMessage()}" for r in caplog.records
            if r.name != RELAY_SERVER_LOG and r.levelno >= level]


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RecipientRefusingRelay(CaptureRelay):
    """A CaptureRelay that refuses RCPT for the addresses in `unknown`."""

    unknown: set[str] = field(default_factory=set)

    async def handle_RCPT(self, server: object, session: Session, envelope: SmtpEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.unknown:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """The worker's kind of store (inline) over files the intake's store created."""
    intake = Store(tmp_path, Keyring(b"k" * 32))
    await intake.start(sweep=True)
    await intake.close()
    store = Store(tmp_path, Keyring(b"k" * 32), durable=False, inline=True)
    await store.start(sweep=True)
    yield store
    await store.close()


async def queue_mail(store: Store, kind: MailKind, n: int, now: float,
                     recipients: tuple[str, ...] = (CUSTOMER,)) -> str:
    """Open one case and queue `n` mails of `kind` for it; returns the case id."""
    raw = f"From: {CUSTOMER}\r\nSubject: private subject\r\n\r\nprivate text\r\n".encode()
    await store.add_inbound([NewMessage("ticketnest", Source.SMTP, Envelope(CUSTOMER, CARE), raw)], now)
    [case] = await store.due_cases([CaseState.RECEIVED], now, 10, BUDGET.cases, set())
    mails = tuple(OutgoingMail(kind, case.id, CARE, recipients, raw, f"<{i}@ticketnest.test>") for i in range(n))
    await store.apply(case, Outcome(CaseState.OPEN, "test", mails=mails), now, now + 86400)
    return case.id


async def attempts(store: Store) -> list[int]:
    """The attempt count of every queued mail, lowest first."""
    return sorted(item.attempts for item in await store.due_mail(float("inf"), 1000, BUDGET.mail))


def notice_for(event: MailEvent, item: QueuedMail, failure: DeliveryFailure | None) -> Outcome:
    """What handlers.EVENTS answer, reduced to its effects: a failed answer reopens with a notice."""
    if event is MailEvent.ANSWER_DELIVERED:
        return Outcome(CaseState.PURGED, "answered", counters=("answered",))
    notice = OutgoingMail(MailKind.NOTICE, item.mail.case_id, CARE, (STAFF,), b"Subject: notice\r\n\r\nx\r\n",
                          "<notice@ticketnest.test>")
    return Outcome(CaseState.OPEN, "answer_failed", mails=(notice,))


async def test_an_outage_is_one_back_off_step_whatever_the_number_of_connections(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there yet: every connection is refused
    config = replace(relay_config(port), retry_delays=(60, 300, 600, 1200), give_up_after=432000, connections=4)
    clock = Clock()
    start = clock.now
    await queue_mail(store, MailKind.FORWARD, 8, start)
    outbox = Outbox(config, store, Relay(config, ""), clock, notice_for, BUDGET.mail)

    async def round_at(now: float) -> list[str]:
        """Run the outbox at `now`; every log line (any logger) that round wrote."""
        clock.now = now
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            await outbox.deliver_due()
        return lines(caplog)

    first = await round_at(start)
    assert await attempts(store) == [1] * 8  # four connections found it down; every mail waits
    assert await round_at(start + 59.999) == []
    probe = await round_at(start + 60)  # retry_delays[0] after the outage began, one mail
    assert await attempts(store) == [1] * 7 + [2]
    assert await round_at(start + 359.999) == []
    second_probe = await round_at(start + 360)  # retry_delays[1] after the failed probe
    assert await attempts(store) == [1] * 6 + [2, 2]
    down = f"WARNING careservice.outbox relay_down relay=127.0.0.1:{port} error=ConnectionRefusedError"
    assert first == [f"{down} retry_in=60 queued=8"]
    assert probe == [f"{down} retry_in=300 queued=8"]
    assert second_probe == [f"{down} retry_in=600 queued=8"]

    relay = CaptureRelay(port=port).start()  # the relay is back
    try:
        assert await round_at(start + 959.999) == []
        delivered = await round_at(start + 960)
        assert len(relay.received) == 8 and await attempts(store) == []
        assert len(delivered) == 8 and all(" mail_delivered " in line for line in delivered)
    finally:
        await outbox.relay.close_idle(0)
        relay.stop()


async def test_a_refusal_is_one_line_naming_the_relay_and_its_code(store: Store,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    relay = CaptureRelay(replies=["550 5.1.1 no such user"]).start()
    config = replace(relay_config(relay.port), retry_delays=(60,), give_up_after=432000)
    clock = Clock()
    answered = await queue_mail(store, MailKind.ANSWER, 1, clock.now)
    outbox = Outbox(config, store, Relay(config, ""), clock, notice_for, BUDGET.mail)
    try:
        with caplog.at_level(logging.DEBUG):
            await outbox.deliver_due()  # the answer is refused; the notice to staff goes through
            relay.replies = ["451 4.3.0 try later"]
            acked = await queue_mail(store, MailKind.ACK, 1, clock.now)
            await outbox.deliver_due()
    finally:
        await outbox.relay.close_idle(0)
        relay.stop()
    refused = f"WARNING careservice.outbox relay_refused relay=127.0.0.1:{relay.port} code="
    assert lines(caplog, logging.WARNING) == [
        f"{refused}550 case={answered} kind=answer permanent=true notice=true",
        f"{refused}451 case={acked} kind=ack permanent=false retry_in=60",
    ]
    assert [c.rcpt_tos for c in relay.received] == [[STAFF]]  # the notice
    assert not [line for line in lines(caplog) if "customer" in line or "private" in line]


async def test_a_failed_answers_event_gets_the_relays_facts(store: Store) -> None:
    """Refused for good, given up after temporary refusals, given up on a relay that cannot be reached: the
    event hands on the reply code and the seconds given up after, as the outbox knew them."""
    relay = CaptureRelay().start()
    config = replace(relay_config(relay.port), retry_delays=(60,), give_up_after=30)  # gives up at the first retry
    clock = Clock()
    events: list[tuple[MailEvent, DeliveryFailure | None]] = []

    def recorded(event: MailEvent, item: QueuedMail, failure: DeliveryFailure | None) -> Outcome:
        events.append((event, failure))
        return notice_for(event, item, failure)

    outbox = Outbox(config, store, Relay(config, ""), clock, recorded, BUDGET.mail)
    try:
        for reply in ("550 5.1.1 no such user", "451 4.3.0 try later"):  # the notice each made goes through
            relay.replies = [reply]
            await queue_mail(store, MailKind.ANSWER, 1, clock.now)
            await outbox.deliver_due()
        relay.stop()  # nothing listens there any more
        await outbox.relay.close_idle(0)
        await queue_mail(store, MailKind.ANSWER, 1, clock.now)
        await outbox.deliver_due()
    finally:
        await outbox.relay.close_idle(0)
        relay.stop()
    assert events == [(MailEvent.ANSWER_FAILED, DeliveryFailure(550, None)),
                      (MailEvent.ANSWER_FAILED, DeliveryFailure(451, 30)),
                      (MailEvent.ANSWER_FAILED, DeliveryFailure(None, 30))]


async def test_partly_refused_recipients_are_one_line(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    relay = RecipientRefusingRelay(unknown={STAFF2}).start()
    config = relay_config(relay.port)
    clock = Clock()
    case = await queue_mail(store, MailKind.FORWARD, 1, clock.now, recipients=(STAFF, STAFF2))
    outbox = Outbox(config, store, Relay(config, ""), clock, notice_for, BUDGET.mail)
    try:
        with caplog.at_level(logging.DEBUG):
            assert await outbox.deliver_due() == 1
    finally:
        await outbox.relay.close_idle(0)
        relay.stop()
    assert [c.rcpt_tos for c in relay.received] == [[STAFF]]
    assert lines(caplog, logging.WARNING) == [
        f"WARNING careservice.outbox relay_refused_recipients relay=127.0.0.1:{relay.port} code=550 case={case} "
        "kind=forward refused=1 recipients=2"]


async def test_an_unwritable_maildir_is_a_relay_down_named_maildir(tmp_path: Path, store: Store,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    config = replace(relay_config(0), url=f"maildir:{blocked}", scheme="maildir", host="", maildir=blocked,
                     retry_delays=(60, 300))
    clock = Clock()
    await queue_mail(store, MailKind.ACK, 2, clock.now)
    outbox = Outbox(config, store, Relay(config, ""), clock, notice_for, BUDGET.mail)
    with caplog.at_level(logging.DEBUG):
        assert await outbox.deliver_due() == 0
    assert lines(caplog) == [
        "WARNING careservice.outbox relay_down relay=maildir error=NotADirectoryError retry_in=60 queued=2"]
    assert await attempts(store) == [1, 1]


async def test_a_connection_dropped_mid_batch_is_one_line_and_no_back_off(store: Store,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    relay = CaptureRelay(replies=["250 2.0.0 taken", "421 4.3.2 closing"]).start()
    config = replace(relay_config(relay.port), retry_delays=(60, 300))
    clock = Clock()
    await queue_mail(store, MailKind.ACK, 3, clock.now)
    outbox = Outbox(config, store, Relay(config, ""), clock, notice_for, BUDGET.mail)
    try:
        with caplog.at_level(logging.DEBUG):
            assert await outbox.deliver_due() == 1
        assert lines(caplog, logging.WARNING) == [
            f"WARNING careservice.outbox relay_dropped relay=127.0.0.1:{relay.port} error=SMTPDataError "
            "code=421 connections=1"]
        assert await attempts(store) == [1, 1]  # the rest wait their own first retry delay
        clock.now += 60  # the relay was reachable: no probe, the whole queue goes
        assert await outbox.deliver_due() == 2
    finally:
        await outbox.relay.close_idle(0)
        relay.stop()
