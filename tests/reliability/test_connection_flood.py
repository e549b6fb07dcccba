"""One client holding idle SMTP connections must not take the service away from everyone: past its
share (smtp.max_connections_per_client, per IPv4 address or IPv6 /64) it gets a 421 greeting at once,
and a session that has not sent MAIL within smtp.idle_before_mail of connecting, or of its last
transaction, gets `421 4.4.2` and is closed, so a client from another address still gets its 250."""

from __future__ import annotations

import os
import signal
import smtplib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from careservice.intake.limits import client_key
from tests.reliability.helpers import SCALE
from tests.reliability.helpers import RawSmtp
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import set_keys
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

FLOOD = min(100, 20 * SCALE)  # idle connections from one address, as many as smtp.max_connections; 100 in the full run
PER_CLIENT = 5  # smtp.max_connections_per_client here
IDLE = 2  # smtp.idle_before_mail here, seconds
LIMIT = IDLE * 10.0  # a generous bound on closing an idle session (smtp.timeout stays at its 300 s)
OTHER = "127.0.0.2"  # a second client: the daemon listens on 127.0.0.1, the whole 127/8 is loopback
SENDER = "flood.victim@customer.example"


@pytest.fixture
def daemon(tmp_path: Path, relay: CaptureRelay) -> Iterator[Daemon]:
    config = set_keys(write_config(tmp_path, relay.port), "smtp", max_connections=FLOOD,
                      max_connections_per_client=PER_CLIENT, idle_before_mail=IDLE)
    proc = Daemon(config).start()
    try:
        yield proc
    finally:
        proc.stop()


def ending(session: RawSmtp) -> tuple[bytes, float]:
    """The server's last reply before it closed the session, and when it closed (monotonic seconds)."""
    session.sock.settimeout(LIMIT)
    last = b""
    try:
        while reply := session.reply():
            last = reply
    except TimeoutError:
        return b"still open after %.0f s: " % LIMIT + last, time.monotonic()
    return last, time.monotonic()


def forwarded(relay: CaptureRelay, marker: str) -> bool:
    return any(marker in str(c.message["Subject"]) for c in relay.to(STAFF))


def test_idle_flood_from_one_address_leaves_room_for_others(daemon: Daemon, relay: CaptureRelay) -> None:
    flood: list[RawSmtp] = []
    try:
        started = time.monotonic()
        flood = [RawSmtp(daemon.smtp_port, timeout=LIMIT) for _ in range(FLOOD)]  # each reads its greeting
        greetings = Counter(s.greeting.split(b" Too")[0] for s in flood)
        assert greetings == {b"220 care.test ESMTP\r\n": PER_CLIENT, b"421 4.7.0": FLOOD - PER_CLIENT}, greetings

        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30, source_address=(OTHER, 0)) as client:
            client.sendmail(SENDER, [CARE], customer_mail("flood-other-mark", "while one address floods us"))
        wait_for(lambda: forwarded(relay, "flood-other-mark"), what="the other client's mail forwarded")

        held = [ending(s) for s in flood if s.greeting.startswith(b"220")]
        assert [reply for reply, _ in held] == [b"421 4.4.2 Idle too long\r\n"] * PER_CLIENT, held
        slowest = max(at for _, at in held) - started
        print(f"\nidle flood: connections={FLOOD} held={PER_CLIENT} refused_421={FLOOD - PER_CLIENT} "
              f"other_client=250 held_closed_after<={slowest:.1f}s (idle_before_mail={IDLE})")
        assert slowest < LIMIT
    finally:
        for session in flood:
            session.close()
    # lines after the first of a loop turn are written at the next turn, possibly after the client read its 421
    wait_for(lambda: daemon.log.read_text().count("session_closed reason=idle_before_mail") >= PER_CLIENT,
             what="the idle sessions' closes logged")
    # counted before the probes below, which are refused too until the held sessions' ends are read
    assert daemon.log.read_text().count("connection_refused reason=too_many_from_client") == FLOOD - PER_CLIENT
    wait_for(lambda: RawSmtp(daemon.smtp_port).greeting.startswith(b"220"), what="the flooding address admitted again")
    assert log_leaks(daemon, [OTHER, SENDER, "flood-other"]) == []  # reason codes and counts only


def test_idle_limit_runs_until_mail_and_again_after_each_transaction(daemon: Daemon, relay: CaptureRelay) -> None:
    partial = RawSmtp(daemon.smtp_port, timeout=LIMIT)
    chatty = RawSmtp(daemon.smtp_port, timeout=LIMIT)
    slow: RawSmtp | None = None
    try:
        partial.send(b"EHLO half-a-comm")  # never a line end: still closed on time, not after smtp.timeout

        assert chatty.command(b"EHLO chatty.example").startswith(b"250")
        deadline = time.monotonic() + LIMIT
        noops = []
        while time.monotonic() < deadline and (reply := chatty.command(b"NOOP")).startswith(b"250"):
            noops.append(reply)  # commands other than MAIL do not extend the limit
            time.sleep(IDLE / 4)
        assert reply == b"421 4.4.2 Idle too long\r\n" and chatty.reply() == b"", (reply, len(noops))

        assert ending(partial)[0] == b"421 4.4.2 Idle too long\r\n"

        slow = RawSmtp(daemon.smtp_port, timeout=LIMIT)
        assert slow.command(b"EHLO slow.example").startswith(b"250")
        for line in (f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{CARE}>".encode()):
            assert slow.command(line).startswith(b"250")
            time.sleep(IDLE * 1.5)  # within a transaction only smtp.timeout applies
        assert slow.command(b"DATA").startswith(b"354")
        slow.send(customer_mail("flood-slow-mark", "a slow but honest client") + b".\r\n")
        assert slow.reply().startswith(b"250"), "the transaction outlived idle_before_mail"
        assert ending(slow)[0] == b"421 4.4.2 Idle too long\r\n"  # idle after its transaction
    finally:
        for session in (partial, chatty, slow):
            if session is not None:
                session.close()
    wait_for(lambda: forwarded(relay, "flood-slow-mark"), what="the slow client's mail forwarded")


def test_a_command_crossing_the_idle_421_does_not_turn_the_close_into_a_reset(daemon: Daemon) -> None:
    """A NOOP sent just as the idle limit runs out is still unread when the daemon says 421. Closing
    with it unread sends a reset, which the client reads as ECONNRESET and which can discard a 421 it
    has not read yet; the daemon must half-close, drop what it still reads and wait for the client's
    close. Stopping the daemon (SIGSTOP) past the limit makes the crossing certain: on resume, the
    limit and the NOOP are due together (uvloop runs the timer first)."""
    session = RawSmtp(daemon.smtp_port, timeout=LIMIT)
    assert session.command(b"EHLO crossing.example").startswith(b"250")
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(IDLE * 1.25)
        session.send(b"NOOP\r\n")
        time.sleep(0.2)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    try:
        assert session.reply() == b"421 4.4.2 Idle too long\r\n"
        assert session.reply() == b""  # not ConnectionResetError
    finally:
        session.close()


@pytest.mark.parametrize(("peer", "key"), [
    (("127.0.0.2", 2525), "127.0.0.2"),
    (("2001:db8::1", 2525, 0, 0), "2001:db8::/64"),
    (("2001:db8::ffff:7", 2525, 0, 0), "2001:db8::/64"),  # one /64: one client
    (("2001:db8:0:1::1", 2525, 0, 0), "2001:db8:0:1::/64"),
    (("::ffff:192.0.2.7", 2525, 0, 0), "192.0.2.7"),  # IPv4 on a dual-stack socket
    (None, "unknown"),
])
def test_clients_are_counted_per_ipv4_address_or_ipv6_64(peer: object, key: str) -> None:
    assert client_key(peer) == key
