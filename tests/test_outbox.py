"""The relay client against a real SMTP server on 127.0.0.1: kept connections, a dropped one, a hung one."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiosmtpd.smtp import Session

from careservice.config import RelayConfig
from careservice.model import MailKind, OutgoingMail
from careservice.outbox import Refusal, Relay
from careservice.store import QueuedMail
from tests.support import CaptureRelay


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
