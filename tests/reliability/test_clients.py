"""Slow and abusive SMTP clients: idle and drip-feeding sessions time out, parallel sessions are
capped, pipelining and bare CR/LF/NUL variants of the end-of-data marker neither split nor merge
mail (SMTP smuggling, CVE-2023-51764 class)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.reliability.helpers import RawSmtp
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import set_keys
from tests.reliability.helpers import status
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

TIMEOUT = 2  # smtp.timeout in these tests, seconds
CAP = 10  # smtp.max_connections in these tests
SMUGGLED = (b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<" + CARE.encode() + b">\r\nDATA\r\n"
            b"From: evil@attacker.example\r\nSubject: SMUGGLED-mark\r\n\r\nsmuggled body\r\n")
END_VARIANTS = {
    "lf_dot_lf": b"\n.\n", "lf_dot_crlf": b"\n.\r\n", "cr_dot_crlf": b"\r.\r\n", "crlf_dot_cr": b"\r\n.\r",
    "crlf_dot_lf": b"\r\n.\n", "lf_dot_cr": b"\n.\r", "cr_dot_cr": b"\r.\r", "nul_before_dot": b"\r\n\x00.\r\n",
    "nul_after_dot": b"\r\n.\x00\r\n", "dot_space": b"\r\n. \r\n",
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, CaptureRelay]]:
    relay = CaptureRelay().start()
    config = set_keys(write_config(tmp_path_factory.mktemp("clients"), relay.port), "smtp", timeout=TIMEOUT,
                      max_connections=CAP)
    proc = Daemon(config).start()
    try:
        yield proc, relay
    finally:
        proc.stop()
        relay.stop()


def closed_within(session: RawSmtp, seconds: float) -> bool:
    """True when the server closes the session (after an optional 421) within `seconds`."""
    session.sock.settimeout(seconds)
    try:
        reply = session.reply()
        return reply == b"" or (reply.startswith(b"421") and session.reply() == b"")
    except TimeoutError:
        return False


def test_idle_session_is_closed(daemon: tuple[Daemon, CaptureRelay]) -> None:
    session = RawSmtp(daemon[0].smtp_port)
    try:
        assert session.greeting.startswith(b"220")
        assert session.command(b"EHLO idle.example").startswith(b"250")
        assert closed_within(session, TIMEOUT * 5)
    finally:
        session.close()


def test_commands_answer_as_aiosmtpd_defines_them(daemon: tuple[Daemon, CaptureRelay]) -> None:
    """A session binds aiosmtpd's commands to itself as they are looked up: HELP finds each with its syntax,
    an unknown one is refused, AUTH reaches aiosmtpd's own check (TLS first), and a transaction still works."""
    session = RawSmtp(daemon[0].smtp_port)
    try:
        assert session.command(b"EHLO help.example").startswith(b"250")
        listed = session.command(b"HELP")
        assert listed.startswith(b"250 Supported commands: ")
        assert {b"DATA", b"EHLO", b"MAIL", b"QUIT", b"RCPT", b"RSET"} <= set(listed.split()[3:])
        assert session.command(b"HELP MAIL").startswith(b"250 Syntax: MAIL FROM: <address>")
        assert session.command(b"FROB x").startswith(b"500")
        assert session.command(b"AUTH PLAIN AGEAYg==").startswith(b"538")
        assert session.command(b"MAIL FROM:<help@customer.example>").startswith(b"250")
        assert session.command(b"RCPT TO:<" + CARE.encode() + b">").startswith(b"250")
        assert session.command(b"RSET").startswith(b"250")
        assert session.command(b"QUIT").startswith(b"221")
    finally:
        session.close()


def test_drip_fed_data_is_cut_off_and_stores_nothing(daemon: tuple[Daemon, CaptureRelay]) -> None:
    proc, _ = daemon
    before = status(proc)
    session = RawSmtp(proc.smtp_port)
    try:
        for line in (b"EHLO slow.example", b"MAIL FROM:<slow@customer.example>", b"RCPT TO:<" + CARE.encode() + b">"):
            assert session.command(line).startswith(b"250")
        assert session.command(b"DATA").startswith(b"354")
        deadline = time.monotonic() + TIMEOUT * 5
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                session.send(b"Subject: slow\r\n")  # one short line a second: activity, but never an end
                time.sleep(1)
            except OSError:
                closed = True
        assert closed or closed_within(session, TIMEOUT * 5)
    finally:
        session.close()
    assert status(proc) == before


def test_parallel_sessions_are_capped_and_the_cap_frees_up(daemon: tuple[Daemon, CaptureRelay]) -> None:
    proc, relay = daemon
    sessions: list[RawSmtp] = []
    try:
        sessions = [RawSmtp(proc.smtp_port) for _ in range(CAP + 5)]
        greetings = [s.greeting[:3] for s in sessions]
        assert greetings.count(b"220") == CAP and greetings.count(b"421") == 5, greetings
        assert all(s.reply() == b"" for s in sessions if s.greeting.startswith(b"421"))
    finally:
        for session in sessions:
            session.close()
    wait_for(lambda: RawSmtp(proc.smtp_port).greeting.startswith(b"220"), what="a free slot again")
    before = len(relay.to(STAFF))
    send(proc.smtp_port, "after.cap@customer.example", [CARE], customer_mail("after cap", "cap-mark"))
    wait_for(lambda: len(relay.to(STAFF)) == before + 1, what="mail after the cap")


def transaction(marker: str, body_end: bytes, tail: bytes) -> bytes:
    """MAIL, RCPT, DATA and a message whose body ends with `body_end` + `tail`, then the real end and QUIT."""
    return (b"MAIL FROM:<smuggler@customer.example>\r\nRCPT TO:<" + CARE.encode() + b">\r\nDATA\r\n"
            + b"From: smuggler@customer.example\r\nSubject: " + marker.encode() + b"\r\n\r\nfirst body"
            + body_end + tail + b"\r\n.\r\n")


@pytest.mark.parametrize("variant", sorted(END_VARIANTS))
def test_smuggled_end_of_data_does_not_split_the_message(daemon: tuple[Daemon, CaptureRelay], variant: str) -> None:
    proc, relay = daemon
    marker = f"smuggle-{variant}-mark"
    session = RawSmtp(proc.smtp_port)
    try:
        session.command(b"EHLO smuggler.example")
        session.send(transaction(marker, END_VARIANTS[variant], SMUGGLED) + b"QUIT\r\n")
        replies = session.replies_until_quiet(quiet=5)
    finally:
        session.close()
    codes = [r[:3] for r in replies]
    assert codes in ([b"250", b"250", b"354", b"250", b"221"],  # one message, the smuggled text inside it
                     [b"250", b"250", b"354", b"550", b"221"], [b"250", b"250", b"354", b"500", b"221"]), replies
    if codes[3] == b"250":
        wait_for(lambda: [c for c in relay.to(STAFF) if marker in str(c.message["Subject"])], what="the forward")
    wait_for(lambda: status(proc)["inbound_pending"] == 0 and status(proc)["outbound_queued"] == 0, what="idle")
    subjects = [str(c.message["Subject"]) for c in relay.to(STAFF)]  # one forward per staff address
    assert not [s for s in subjects if "SMUGGLED" in s], subjects
    assert sum(marker in s for s in subjects) == (codes[3] == b"250")
    assert not relay.to("evil@attacker.example")


def test_pipelined_transactions_stay_separate(daemon: tuple[Daemon, CaptureRelay]) -> None:
    proc, relay = daemon
    session = RawSmtp(proc.smtp_port)
    try:
        session.command(b"EHLO pipeliner.example")
        session.send(transaction("pipe-one-mark", b"", b"") + transaction("pipe-two-mark", b"", b"") + b"QUIT\r\n")
        replies = session.replies_until_quiet(quiet=5)
    finally:
        session.close()
    assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250"] * 2 + [b"221"], replies
    for marker in ("pipe-one-mark", "pipe-two-mark"):
        wait_for(lambda m=marker: [c for c in relay.to(STAFF) if m in str(c.message["Subject"])], what=marker)
    subjects = [str(c.message["Subject"]) for c in relay.to(STAFF)]
    assert sum("pipe-one-mark" in s for s in subjects) == 1 and sum("pipe-two-mark" in s for s in subjects) == 1


def test_no_personal_data_logged_by_abusive_clients(daemon: tuple[Daemon, CaptureRelay]) -> None:
    assert log_leaks(daemon[0], ["smuggle", "SMUGGLED", "attacker.example", "pipe-", "customer.example"]) == []


def test_half_open_connections_do_not_block_others(daemon: tuple[Daemon, CaptureRelay]) -> None:
    """Clients that connect and never speak hold a slot only until the idle timeout."""
    proc, _ = daemon
    silent = [socket.create_connection(("127.0.0.1", proc.smtp_port), timeout=TIMEOUT * 5) for _ in range(CAP)]
    try:
        wait_for(lambda: RawSmtp(proc.smtp_port).greeting.startswith(b"220"), timeout=TIMEOUT * 5,
                 what="slots freed by the idle timeout")
    finally:
        for sock in silent:
            sock.close()
