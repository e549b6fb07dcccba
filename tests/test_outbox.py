"""The relay client against a real SMTP server on 127.0.0.1: kept connections, and a dropped one."""

from __future__ import annotations

from dataclasses import dataclass

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


def relay_config(port: int) -> RelayConfig:
    return RelayConfig(url=f"smtp://127.0.0.1:{port}", scheme="smtp", host="127.0.0.1", port=port, maildir=None,
                       retry_delays=(1,), give_up_after=60, username="", password_file="", timeout=10,
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
