"""The relay client's pipelined transactions (RFC 2920) against real SMTP servers on 127.0.0.1: an aiosmtpd
relay that advertises PIPELINING, the same without it, and Postfix's smtp-sink when installed; each refusal
the outbox tells apart, and a connection dropped once the pipelined commands are out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path

import aiosmtplib
import pytest
import uvloop
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session
from aiosmtplib.email import quote_address

from bench.postfix import Postfix
from careservice import smtpclient
from careservice.crypto import Keyring
from careservice.model import MailKind
from careservice.model import OutgoingMail
from careservice.outbox import Outbox
from careservice.outbox import Refusal
from careservice.outbox import Relay
from careservice.outbox import RelayDown
from careservice.store import QueuedMail
from careservice.store import Store
from tests.support import free_port
from tests.test_outbox import BUDGET
from tests.test_outbox import Clock
from tests.test_outbox import CountingRelay
from tests.test_outbox import attempts
from tests.test_outbox import lines
from tests.test_outbox import notice_for
from tests.test_outbox import queue_mail
from tests.test_outbox import queued
from tests.test_outbox import relay_config
from tests.test_outbox import send

KNOWN = "c@customer.example"
UNKNOWN = "gone@customer.example"


@dataclass
class PipeliningRelay(CountingRelay):
    """An aiosmtpd relay that offers PIPELINING (aiosmtpd reads commands in order, so it can take them
    pipelined; it just does not say so), notes per MAIL whether DATA had already arrived with it, and
    scripts refusals: `mail_reply` for MAIL, RCPT for the addresses in `unknown`, and a dropped connection
    at RCPT number `drop_at_rcpt` (1-based, counted over the server's life). It notes per content too
    whether the next mail's MAIL had arrived with it."""

    offer: bool = True
    mail_reply: str = ""
    unknown: set[str] = field(default_factory=set)
    drop_at_rcpt: int = 0
    pipelined: list[bool] = field(default_factory=list)
    ahead: list[bool] = field(default_factory=list)  # per content: whether the next MAIL came with it
    rcpts: int = 0

    async def handle_EHLO(self, server: object, session: Session, envelope: object, hostname: str,
                          responses: list[str]) -> list[str]:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [*responses[:-1], "250-PIPELINING", responses[-1]] if self.offer else responses

    async def handle_MAIL(self, server: object, session: Session, envelope: SmtpEnvelope, address: str,
                          mail_options: list[str]) -> str:
        # what the client wrote after MAIL and the server has not read yet (aiosmtpd peeks there too)
        self.pipelined.append(b"DATA\r\n" in bytes(server._reader._buffer))  # type: ignore[attr-defined]
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.ahead.append(b"MAIL FROM:" in bytes(server._reader._buffer))  # type: ignore[attr-defined]
        return await super().handle_DATA(server, session, envelope)

    async def handle_RCPT(self, server: object, session: Session, envelope: SmtpEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpts += 1
        if self.rcpts == self.drop_at_rcpt:
            server.transport.close()  # type: ignore[attr-defined]
            return "250 OK"
        if address in self.unknown:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@contextlib.contextmanager
def serving(server: PipeliningRelay) -> Iterator[Relay]:
    """`server` started, and a Relay client of it; the server stops at the end."""
    server.start()
    try:
        yield Relay(relay_config(server.port), "")
    finally:
        server.stop()


def to(n: int, *recipients: str) -> QueuedMail:
    item = queued(n)
    mail = item.mail
    return QueuedMail(item.id, item.site, item.attempts, item.created,
                      OutgoingMail(MailKind.FORWARD, mail.case_id, mail.sender, recipients, mail.message,
                                   mail.message_id))


async def test_mail_rcpt_and_data_go_in_one_write_when_the_relay_offers_pipelining() -> None:
    server = PipeliningRelay()
    with serving(server) as relay:
        assert await send(relay, [queued(1), to(2, KNOWN, "d@customer.example"), queued(3)]) == [None] * 3
        # the first mail greets (aiosmtplib's EHLO), the rest of the session is pipelined, the third
        # mail's envelope in the same write as the second's content
        assert server.pipelined == [False, True, True] and server.sessions == 1
        assert server.ahead == [False, True, False]
        assert [c.rcpt_tos for c in server.received] == [[KNOWN], [KNOWN, "d@customer.example"], [KNOWN]]
        assert [c.raw for c in server.received] == [queued(n).mail.message for n in (1, 2, 3)]


def test_pipelined_mail_on_uvloop() -> None:
    """service.event_loop = "uvloop" (the default): its transports take the connection's data the same way."""
    server = PipeliningRelay(unknown={UNKNOWN})
    with serving(server) as relay:
        results = uvloop.run(send(relay, [queued(1), to(2, KNOWN, UNKNOWN), to(3, UNKNOWN), queued(4)]))
        assert results == [None, None, Refusal(550, True), None]
        assert server.pipelined == [False, True, True, True] and server.sessions == 1
        assert [c.raw for c in server.received] == [queued(n).mail.message for n in (1, 2, 4)]


async def test_a_refused_content_leaves_the_envelope_that_went_ahead_with_it_intact() -> None:
    """The relay's refusal at the end of the content ended that transaction: no RSET follows, which
    would reset the mail ahead, or, after its DATA, be sent to the next recipient as its content."""
    server = PipeliningRelay()
    with serving(server) as relay:
        assert await send(relay, [queued(1)]) == [None]
        server.replies = ["554 5.6.0 content refused"]
        assert await send(relay, [queued(2), queued(3), queued(4)]) == [Refusal(554, True), None, None]
        assert server.ahead == [False, True, True, False] and server.sessions == 1
        assert [c.raw for c in server.received] == [queued(n).mail.message for n in (1, 3, 4)]
        assert await send(relay, [queued(5)]) == [None]  # the kept connection is in a clean state
        assert server.sessions == 1 and len(server.received) == 4


async def test_a_stop_with_an_envelope_ahead_sends_that_mail_and_no_other() -> None:
    """The relay waits for the content of the mail whose envelope went ahead: that mail is in flight, so a
    stop sends it, and nothing more goes ahead; the connection ends cleanly (a closed one would leave the
    relay a transaction cut off after DATA)."""
    server = PipeliningRelay()
    with serving(server) as relay:
        assert await send(relay, [queued(1)]) == [None]
        recorded: list[int] = []

        async def record(item: QueuedMail, refusal: Refusal | None) -> None:
            recorded.append(item.id)
            relay.stopping = True

        await relay.send_all([queued(2), queued(3), queued(4)], record)
        assert recorded == [2, 3] and server.ahead == [False, True, False]
        assert relay.keeps_connections and server.sessions == 1
        assert [c.raw for c in server.received] == [queued(n).mail.message for n in (1, 2, 3)]


async def test_a_record_that_fails_with_an_envelope_ahead_closes_the_connection() -> None:
    """Only closing the connection ends the transaction of a mail whose envelope went ahead: when the store
    cannot record the delivery before it, that mail stays queued and goes over a new connection."""
    server = PipeliningRelay()
    with serving(server) as relay:
        assert await send(relay, [queued(1)]) == [None]

        async def record(item: QueuedMail, refusal: Refusal | None) -> None:
            raise RuntimeError("the store failed")

        with pytest.raises(RuntimeError):
            await relay.send_all([queued(2), queued(3)], record)
        assert server.ahead == [False, True] and not relay.keeps_connections
        assert await send(relay, [queued(3)]) == [None]
        assert server.sessions == 2
        assert [c.raw for c in server.received] == [queued(n).mail.message for n in (1, 2, 3)]


async def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    server = PipeliningRelay(offer=False)
    with serving(server) as relay:
        assert await send(relay, [queued(1), queued(2), queued(3)]) == [None] * 3
        assert server.pipelined == [False] * 3 and len(server.received) == 3


async def test_a_body_with_dots_and_bare_newlines_arrives_as_aiosmtplib_sends_it() -> None:
    server = PipeliningRelay()
    with serving(server) as relay:
        body = b"From: care@ticketnest.test\nSubject: dots\n\n.\n..two\n.leading\r\nlast"
        item = queued(2)
        dotted = QueuedMail(2, item.site, 0, 0.0, OutgoingMail(MailKind.ACK, "case", "", (KNOWN,), body, "2@t"))
        assert await send(relay, [queued(1), dotted]) == [None, None]
        assert server.pipelined == [False, True]
        assert server.received[1].raw == body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


async def test_a_crlf_body_with_dot_lines_is_dot_stuffed_on_the_fast_path() -> None:
    """A rendered message has CRLF line ends only, so it skips aiosmtplib's line-end regex; its dots are
    still stuffed, and a lone CR still sends it down the regex path."""
    server = PipeliningRelay()
    with serving(server) as relay:
        bodies = [b".first\r\nSubject: d\r\n\r\n.\r\n..two\r\nx.y\r\n", b"Subject: r\r\n\r\na\rb\r\n",
                  b"Subject: n\r\n\r\nno end"]
        items = [QueuedMail(n, "ticketnest", 0, 0.0, OutgoingMail(MailKind.ACK, "case", "", (KNOWN,), body, f"{n}@t"))
                 for n, body in enumerate(bodies, 2)]
        assert await send(relay, [queued(1), *items]) == [None] * 4
        assert server.pipelined == [False, True, True, True]
        assert [c.raw for c in server.received[1:]] == [bodies[0], b"Subject: r\r\n\r\na\r\nb\r\n",
                                                        bodies[2] + b"\r\n"]


@pytest.mark.parametrize("address", ["c@customer.example", "o'neil+tag/x=y@sub.customer-1.example", "a.b.c@d",
                                     "a..b@d.example", ".a@d.example", "a@d..example", "a@[127.0.0.1]",
                                     '"a b"@d.example', "Name <a@d.example>", "", "a@d.example.", "ä@d.example"])
def test_addresses_go_on_the_command_line_exactly_as_aiosmtplib_quotes_them(address: str) -> None:
    assert smtpclient._quoted(address) == quote_address(address)


async def test_an_address_that_cannot_go_on_a_command_line_sends_nothing() -> None:
    """As aiosmtplib's sendmail: an address with a space (which could smuggle in an ESMTP parameter) raises
    before any command is written, and the session stays usable."""
    server = PipeliningRelay()
    with serving(server):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port) as client:
            session = smtpclient.Session(client)
            await session.sendmail(smtpclient.Mail(KNOWN, [KNOWN], queued(1).mail.message))
            for sender, recipient in [(KNOWN, "c NOTIFY=NEVER@customer.example"), ("c d@customer.example", KNOWN)]:
                with pytest.raises(ValueError, match="not permitted in an SMTP mailbox"):
                    await session.sendmail(smtpclient.Mail(sender, [KNOWN, recipient], queued(2).mail.message))
            assert server.rcpts == 1
            await session.sendmail(smtpclient.Mail(KNOWN, [KNOWN], queued(3).mail.message))
            assert session.end(keep=True)  # aiosmtplib's QUIT needs the connection's own protocol back
        assert server.pipelined == [True, True] and server.rcpts == 2 and server.sessions == 1
        assert [c.raw for c in server.received] == [queued(n).mail.message for n in (1, 3)]


@pytest.mark.parametrize(("reply", "refusal"), [("550 5.7.1 not you", Refusal(550, True)),
                                                 ("451 4.3.0 later", Refusal(451, False))])
async def test_a_refused_mail_from_is_classified_and_the_session_stays_usable(reply: str,
                                                                              refusal: Refusal) -> None:
    server = PipeliningRelay()
    with serving(server) as relay:
        assert await send(relay, [queued(1)]) == [None]
        server.mail_reply = reply
        assert await send(relay, [queued(2)]) == [refusal]
        server.mail_reply = ""
        assert await send(relay, [queued(3)]) == [None]
        assert server.pipelined == [False, True, True] and server.sessions == 1
        assert [c.raw for c in server.received] == [queued(1).mail.message, queued(3).mail.message]


async def test_one_of_two_recipients_refused_delivers_to_the_other(caplog: pytest.LogCaptureFixture) -> None:
    server = PipeliningRelay(unknown={UNKNOWN})
    with serving(server) as relay:
        assert await send(relay, [queued(1), to(2, UNKNOWN, KNOWN)]) == [None, None]
        assert server.pipelined == [False, True]
        assert [c.rcpt_tos for c in server.received] == [[KNOWN], [KNOWN]]
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relay_refused_recipients")]
        assert refused == [f"relay_refused_recipients relay=127.0.0.1:{server.port} code=550 case=case kind=forward"
                           " refused=1 recipients=2"]


async def test_all_recipients_refused_reads_datas_refusal_and_resets() -> None:
    server = PipeliningRelay(unknown={UNKNOWN, "also@customer.example"})
    with serving(server) as relay:
        results = await send(relay, [queued(1), to(2, UNKNOWN, "also@customer.example"), queued(3)])
        assert results == [None, Refusal(550, True), None]
        # DATA's 503 was read, RSET cleared the envelope: the next mail went over the same session
        assert server.pipelined == [False, True, True] and server.sessions == 1
        assert [c.raw for c in server.received] == [queued(1).mail.message, queued(3).mail.message]


async def test_a_connection_dropped_after_the_pipelined_commands_is_relay_down_and_not_sent() -> None:
    server = PipeliningRelay(drop_at_rcpt=2)
    with serving(server) as relay:
        recorded: list[int] = []

        async def record(item: QueuedMail, refusal: Refusal | None) -> None:
            recorded.append(item.id)

        with pytest.raises(RelayDown) as down:
            await relay.send_all([queued(1), queued(2), queued(3)], record)
        assert down.value.done == 1 and recorded == [1]
        assert "error=SMTPServerDisconnected" in down.value.fields
        assert server.pipelined == [False, True] and len(server.received) == 1
        assert not relay.keeps_connections
        assert await send(relay, [queued(2)]) == [None]  # a new connection takes it
        assert len(server.received) == 2 and server.sessions == 2


async def test_a_relay_closing_with_421_mid_pipeline_is_relay_down_with_its_code() -> None:
    server = PipeliningRelay()
    with serving(server) as relay:
        assert await send(relay, [queued(1)]) == [None]
        server.mail_reply = "421 4.3.2 shutting down"
        with pytest.raises(RelayDown) as down:
            await send(relay, [queued(2)])
        assert down.value.done == 0 and "code=421" in down.value.fields
        assert len(server.received) == 1


@pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="Postfix's smtp-sink is not installed")
async def test_postfixs_smtp_sink_takes_pipelined_mail() -> None:
    port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{port}", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        relay = Relay(relay_config(port), "")
        for _ in range(50):  # bounded: smtp-sink binds a moment after it starts
            if await relay.reachable():
                break
            await asyncio.sleep(0.1)
        items = [queued(1), to(2, KNOWN, "d@customer.example"), queued(3)]
        assert await send(relay, items) == [None] * 3
        await relay.close_idle(0)
    finally:
        sink.terminate()
        out, _ = sink.communicate(timeout=10)
    assert b"mesg=3" in out  # -c: smtp-sink counts the messages it took


@pytest.mark.skipif(Postfix.unavailable() != "", reason=f"a private Postfix cannot run here: {Postfix.unavailable()}")
async def test_postfix_takes_each_envelope_behind_the_previous_content_as_rfc_2920_allows() -> None:
    """Postfix 3.9 and later disconnect a client whose pipelining RFC 2920 forbids (Debian 12's 3.7 has the
    check, off by default). With it on, a client pipelining after EHLO is cut off; mail sent with each
    envelope ahead of its content reaches the queue, and the log has no other complaint."""
    with tempfile.TemporaryDirectory(prefix="careservice-test-postfix-") as tmp:
        root = Path(tmp)
        with Postfix(root, "smtpd_forbid_unauth_pipelining = yes\n") as postfix:
            reader, writer = await asyncio.open_connection("127.0.0.1", postfix.port)
            await reader.readline()
            writer.write(b"EHLO client.example\r\nMAIL FROM:<>\r\n")  # EHLO must end its group
            assert await asyncio.wait_for(reader.read(), 30) == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
            writer.close()
            relay = Relay(relay_config(postfix.port), "")
            items = [queued(1), to(2, KNOWN, "d@customer.example"), *(queued(n) for n in range(3, 7))]
            assert await send(relay, items) == [None] * 6
            await relay.close_idle(0)
            for _ in range(300):  # bounded: the queue manager hands each mail to the discard agent
                if postfix.delivered() >= 7:
                    break
                await asyncio.sleep(0.1)
            log = (root / "postfix.log").read_text()
            assert postfix.delivered() == 7, log[-2000:]
        complaints = [line for line in log.splitlines() if "pipelining" in line or "synchronization" in line]
        assert len(complaints) == 1 and "after EHLO" in complaints[0], complaints


async def test_the_outbox_retries_mail_a_pipelined_session_dropped_and_never_marks_it_sent(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    intake = Store(tmp_path, Keyring(b"k" * 32))
    await intake.start(sweep=True)
    await intake.close()
    store = Store(tmp_path, Keyring(b"k" * 32), durable=False, inline=True)
    await store.start(sweep=True)
    server = PipeliningRelay(drop_at_rcpt=2).start()
    config = replace(relay_config(server.port), retry_delays=(60, 300))
    clock = Clock()
    outbox = Outbox(config, store, Relay(config, ""), clock, notice_for, BUDGET.mail)
    try:
        await queue_mail(store, MailKind.ACK, 3, clock.now)
        with caplog.at_level(logging.DEBUG):
            assert await outbox.deliver_due() == 1
        assert lines(caplog, logging.WARNING) == [
            f"WARNING careservice.outbox relay_dropped relay=127.0.0.1:{server.port} error=SMTPServerDisconnected"
            " connections=1"]
        assert await attempts(store) == [1, 1]  # the two after the first wait their retry, not marked sent
        assert len(server.received) == 1 and server.pipelined == [False, True]
        clock.now += 60
        assert await outbox.deliver_due() == 2
        assert len(server.received) == 3 and await attempts(store) == []
    finally:
        await outbox.relay.close_idle(0)
        server.stop()
        await store.close()
