"""A multi-megabyte From header through IMAP intake: the intake process looks for the envelope sender
and the Message-ID as careservice.mail's parser looks at headers (the first MAX_HEADER_BLOCK bytes,
no header over MAX_HEADER_LINE), so such a message costs it little CPU and is taken like any other,
with the normal mail behind it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from careservice.intake.headers import envelope_sender
from careservice.mimeparse import MAX_HEADER_BLOCK
from tests.dovecot import DovecotServer
from tests.reliability.helpers import SCALE
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import set_keys
from tests.reliability.helpers import status
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import imap_config
from tests.support import wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.imap]

FROM_BYTES = 9_000_000 if SCALE > 1 else 3_000_000  # the attack's header was 9 MB
CPU_BOUND = 1.0  # seconds of the intake process's CPU for the whole pass: a bound, not a target
SENDER = "big.header@customer.example"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def big_from() -> bytes:
    """A From header of FROM_BYTES, folded into legal lines, of the list of addresses that costs the
    stdlib address parser most per byte, and a real address at its end."""
    line = b"a@b," * 225
    return (b"From: " + b"\r\n ".join([line] * (FROM_BYTES // len(line))) + b"\r\n <" + SENDER.encode()
            + b">\r\nTo: " + CARE.encode() + b"\r\nSubject: big-header-mark\r\n"
            + b"Message-ID: <big-header@customer.example>\r\n\r\nbody\r\n")


def forwarded(relay: CaptureRelay, marker: str) -> bool:
    return any(marker in str(c.message["Subject"]) for c in relay.to(STAFF))


def test_a_huge_from_header_costs_the_intake_little(tmp_path: Path, relay: CaptureRelay,
                                                    dovecot: DovecotServer) -> None:
    raw = big_from()
    config = set_keys(imap_config(tmp_path / "svc", relay, dovecot), "smtp", max_message_bytes=len(raw) + 1_000_000)
    # in the mailbox before the daemon starts: Dovecot reports mail appended between the worker's
    # first SEARCH and its IDLE only when the IDLE ends
    dovecot.append(customer_mail("before-big-header-mark", "warms the intake up"))
    daemon = Daemon(config).start()
    try:
        assert daemon.proc is not None
        wait_for(lambda: forwarded(relay, "before-big-header-mark"), timeout=30, what="the first mail")
        before, started = cpu_seconds(daemon.proc.pid), time.monotonic()
        dovecot.append(raw)
        dovecot.append(customer_mail("after-big-header-mark", "a normal mail behind the big header"))
        wait_for(lambda: dovecot.count() == 0, timeout=120, what="the mailbox drained")
        cpu, took = cpu_seconds(daemon.proc.pid) - before, time.monotonic() - started
        wait_for(lambda: forwarded(relay, "after-big-header-mark"), timeout=60, what="the mail behind it")
        wait_for(lambda: status(daemon)["inbound_pending"] == 0, timeout=120, what="the big one processed")
        print(f"\nbig From header over IMAP: header={FROM_BYTES} bytes intake_cpu={cpu:.2f}s drained_in={took:.1f}s")
        assert cpu < CPU_BOUND
        log = daemon.log.read_text()
        assert "imap_failed" not in log and "internal_error" not in log
        assert log_leaks(daemon, [SENDER, "a@b,", "big-header"]) == []
    finally:
        daemon.stop()


def test_the_envelope_sender_is_read_as_the_parser_reads_headers() -> None:
    """A header over MAX_HEADER_LINE is skipped (the next one counts, as in careservice.mail.parse), and
    nothing after the first MAX_HEADER_BLOCK bytes is looked at."""
    long_from = b"From: " + b"\r\n ".join([b"a@b," * 225] * 10) + b"\r\n"
    assert envelope_sender(long_from + b"From: <" + SENDER.encode() + b">\r\n\r\nbody\r\n") == SENDER
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 900) for i in range(MAX_HEADER_BLOCK // 900))
    late = b"From: <" + SENDER.encode() + b">\r\nReturn-Path: <late@customer.example>\r\n"
    assert envelope_sender(b"From: <first@customer.example>\r\n" + filler + late + b"\r\nbody\r\n") == \
        "first@customer.example"
    assert envelope_sender(filler + late + b"\r\nbody\r\n") == ""
