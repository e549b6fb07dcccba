"""IMAP intake against a real Dovecot on loopback, with the daemon as a real process."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from unittest.mock import patch

import pytest
from imapclient import DELETED

from careservice.config import ConfigError
from careservice.config import load_config
from careservice.intake.headers import envelope_recipient
from careservice.intake.headers import mailbox_envelope
from careservice.intake.imap import BATCH
from careservice.intake.imap import MailboxWorker
from careservice.model import Envelope
from tests.dovecot import DovecotServer
from tests.imapcrash import POINT_ENV
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import imap_config
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.imap

CUSTOMER = "alice@customer.example"


def mailbox_name(dovecot: DovecotServer, folder: str = "INBOX") -> str:
    return f"{dovecot.username}@{dovecot.host}:{dovecot.port}/{folder}"


@pytest.fixture
def svc(tmp_path: Path, relay: CaptureRelay, dovecot: DovecotServer) -> Iterator[Daemon]:
    """A daemon configured for the test Dovecot, not yet started; stopped after the test."""
    daemon = Daemon(imap_config(tmp_path / "svc", relay, dovecot))
    try:
        yield daemon
    finally:
        daemon.stop()


def imap_health(daemon: Daemon, name: str) -> dict[str, object]:
    return daemon.status().get("imap", {}).get(name, {})


def wait_idle(daemon: Daemon, dovecot: DovecotServer) -> None:
    """Wait until the worker has drained the folder once (it then IDLEs)."""
    wait_for(lambda: imap_health(daemon, mailbox_name(dovecot)).get("ok") is True, what="imap mailbox working")


def maildir_files(dovecot: DovecotServer) -> list[Path]:
    """The INBOX's message files on disk: what the server still keeps."""
    return [p for sub in ("new", "cur") for p in (dovecot.maildir / sub).iterdir()]


def deliver_files(dovecot: DovecotServer, raws: list[bytes]) -> None:
    """Deliver straight into the Maildir (tmp/, then rename into new/), as a local delivery agent does."""
    dovecot.count()  # the first SELECT creates the Maildir
    owner = dovecot.maildir.parent.stat()
    for sub in ("tmp", "new", "cur"):
        (dovecot.maildir / sub).mkdir(exist_ok=True)
    for i, raw in enumerate(raws):
        name = f"1700000000.M{i}P{os.getpid()}.test"
        tmp = dovecot.maildir / "tmp" / name
        tmp.write_bytes(raw)
        os.chown(tmp, owner.st_uid, owner.st_gid)
        tmp.rename(dovecot.maildir / "new" / name)


def taken(daemon: Daemon) -> tuple[int, int]:
    """Messages committed from IMAP according to the log, and how many of them were duplicates."""
    found = re.findall(r"imap_taken mailbox=\S+ messages=(\d+) duplicates=(\d+)", daemon.log.read_text())
    return sum(int(m) for m, _ in found), sum(int(d) for _, d in found)


def many(n: int, tag: str) -> list[bytes]:
    return [customer_mail(f"{tag} {i}", f"text {i}", sender=f"c{i}@customer.example") for i in range(n)]


def forwards(relay: CaptureRelay, subject: str) -> list[str]:
    return [str(c.message["Subject"]) for c in relay.to(STAFF) if subject in str(c.message["Subject"])]


def test_mail_present_before_start_is_taken_and_removed(svc: Daemon, relay: CaptureRelay,
                                                        dovecot: DovecotServer) -> None:
    for i in range(3):
        dovecot.append(customer_mail(f"Waiting {i}", f"text {i}"))
    assert dovecot.count() == 3 and len(maildir_files(dovecot)) == 3
    svc.start()
    wait_for(lambda: len(relay.to(STAFF)) == 3, what="three forwards")
    assert all(len(forwards(relay, f"Waiting {i}")) == 1 for i in range(3))
    wait_for(lambda: dovecot.count() == 0, what="mailbox empty")
    assert maildir_files(dovecot) == []
    wait_for(lambda: relay.to(CUSTOMER), what="ack to the customer")
    health = imap_health(svc, mailbox_name(dovecot))
    assert health["ok"] is True and health["problem"] == "" and health["consecutive_failures"] == 0


def test_new_mail_arrives_through_idle_and_sigterm_stops(svc: Daemon, relay: CaptureRelay,
                                                         dovecot: DovecotServer) -> None:
    svc.start()  # poll_seconds = 60: only IDLE can deliver within the 10 s below
    wait_idle(svc, dovecot)
    dovecot.append(customer_mail("Via idle", "pushed"))
    wait_for(lambda: forwards(relay, "Via idle"), timeout=10, what="forward of mail appended while idling")
    wait_for(lambda: dovecot.count() == 0, what="mailbox empty")
    assert "idle=True" in svc.log.read_text()
    assert svc.stop() == 0  # SIGTERM interrupts the IDLE; a hang would end in SIGKILL (-9)


def delivered(raw: bytes, *to: str) -> bytes:
    """`raw` with Delivered-To headers on top, the first of `to` topmost (as the provider, which delivers
    last, prepends its own above any the sender wrote)."""
    return b"".join(f"Delivered-To: {address}\r\n".encode() for address in to) + raw


def answers(relay: CaptureRelay, marker: str) -> list[str]:
    """The texts of the mail to the customer that contain `marker`."""
    texts = [c.message.get_body(("plain",)).get_content() for c in relay.to(CUSTOMER)]
    return [t for t in texts if marker in t]


def opened(svc: Daemon, relay: CaptureRelay, dovecot: DovecotServer, subject: str, body: str) -> EmailMessage:
    """Start the daemon, have a customer mail taken from the mailbox; the forward staff got."""
    svc.start()
    wait_idle(svc, dovecot)
    dovecot.append(customer_mail(subject, body))
    wait_for(lambda: forwards(relay, subject), what="forward")
    return relay.to(STAFF)[-1].message


def test_staff_answer_over_imap_is_relayed(svc: Daemon, relay: CaptureRelay, dovecot: DovecotServer) -> None:
    forward = opened(svc, relay, dovecot, "Refund please", "Order 4711 wombat")
    address = forward["Reply-To"].addresses[0].addr_spec
    dovecot.append(delivered(staff_reply(forward, "Your refund is on its way."), address))
    wait_for(lambda: answers(relay, "refund is on its way"), what="answer relayed to the customer")
    wait_for(lambda: svc.status()["open_cases"] == 0, what="case purged after the answer")
    assert dovecot.count() == 0
    assert files_containing(svc.data_dir, [b"wombat", b"refund is on its way", CUSTOMER.encode()]) == []


def test_a_token_only_in_to_cc_or_a_lower_delivered_to_answers_nobody(svc: Daemon, relay: CaptureRelay,
                                                                     dovecot: DovecotServer) -> None:
    """The reply address copied where a sender can write it, to mail the provider delivered to the care
    address: each is a new case (forwarded to staff), nothing reaches the customer and the case stays open."""
    forward = opened(svc, relay, dovecot, "Lost tickets", "Order 4712")
    address = forward["Reply-To"].addresses[0].addr_spec
    in_to = staff_reply(forward, "Forged in To")  # and no Delivered-To at all: the care address
    in_cc = delivered(staff_reply(forward, "Forged in Cc", to=CARE).replace(b"\r\nSubject:",
                                                                            f"\r\nCc: {address}\r\nSubject:".encode()),
                      CARE)
    below = delivered(staff_reply(forward, "Forged below"), CARE, address)  # the provider's is on top
    for raw in (in_to, in_cc, below):
        dovecot.append(raw)
    wait_for(lambda: len(forwards(relay, "Re: ")) == 3, what="three new cases forwarded to staff")
    wait_for(lambda: svc.status()["outbound_queued"] == 0, what="outbox drained")
    assert answers(relay, "Forged") == []
    assert svc.status()["open_cases"] == 4  # the case and the three new ones
    dovecot.append(delivered(staff_reply(forward, "Found them, sent again."), address))
    wait_for(lambda: answers(relay, "Found them"), what="the genuine answer, so the case was still open")
    assert answers(relay, "Forged") == []


@pytest.mark.parametrize("point", ["commit", "flag"])
def test_crash_between_commit_and_expunge_makes_no_second_case(tmp_path: Path, relay: CaptureRelay,
                                                               dovecot: DovecotServer, point: str) -> None:
    config = imap_config(tmp_path / "svc", relay, dovecot)
    repo = str(Path(__file__).parent.parent)
    crashing = Daemon(config, env={POINT_ENV: point, "PYTHONPATH": repo}, module="tests.imapcrash").start()
    try:
        wait_idle(crashing, dovecot)
        dovecot.append(customer_mail("Only once", "crash test"))
        assert crashing.proc is not None
        assert crashing.proc.wait(20) == 137
    finally:
        crashing.stop()
    with dovecot.client() as imap:  # committed, but still on the server
        imap.select_folder("INBOX", readonly=True)
        flags = list(imap.get_flags(imap.search("ALL")).values())
    assert len(flags) == 1 and (DELETED in flags[0]) == (point == "flag")
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: dovecot.count() == 0, what="mailbox empty after restart")
        wait_for(lambda: forwards(relay, "Only once"), what="forward of the committed case")
        wait_for(lambda: daemon.status()["outbound_queued"] == 0 and daemon.status()["inbound_pending"] == 0,
                 what="queues drained")
        assert len(forwards(relay, "Only once")) == 1
        assert daemon.status()["open_cases"] == 1
        assert "imap_taken mailbox=" in daemon.log.read_text() and "duplicates=1" in daemon.log.read_text()
    finally:
        daemon.stop()


def test_wrong_password_is_reported_then_recovers(tmp_path: Path, relay: CaptureRelay,
                                                  dovecot: DovecotServer) -> None:
    config = imap_config(tmp_path / "svc", relay, dovecot, password="not-the-password")
    dovecot.append(customer_mail("Secret subject xyzzy", "secret body plugh"))
    name = mailbox_name(dovecot)
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: imap_health(daemon, name).get("problem") == "auth_failed", what="auth_failed in status")
        health = imap_health(daemon, name)
        assert health["ok"] is False and int(health["consecutive_failures"]) >= 1  # type: ignore[call-overload]
        log = daemon.log.read_text()
        assert f"imap_failed mailbox={name} problem=auth_failed" in log
        assert "xyzzy" not in log and "plugh" not in log and "not-the-password" not in log
        assert dovecot.count() == 1
        (config.parent / "imap.password").write_text(dovecot.password)  # read again on the next attempt
        wait_for(lambda: forwards(relay, "xyzzy"), what="mail taken once the password is right")
        wait_for(lambda: imap_health(daemon, name).get("ok") is True, what="mailbox healthy again")
        assert dovecot.count() == 0
    finally:
        daemon.stop()


def test_tls_failure_is_reported(tmp_path: Path, relay: CaptureRelay, dovecot: DovecotServer) -> None:
    config = imap_config(tmp_path / "svc", relay, dovecot, security="tls")  # the test Dovecot speaks plain text
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: imap_health(daemon, mailbox_name(dovecot)).get("problem") == "tls_error",
                 what="tls_error in status")
        assert f"imap_failed mailbox={mailbox_name(dovecot)} problem=tls_error" in daemon.log.read_text()
    finally:
        daemon.stop()


def test_too_large_message_goes_to_quarantine(svc: Daemon, relay: CaptureRelay, dovecot: DovecotServer) -> None:
    dovecot.append(customer_mail("Huge", "x" * 300_000))  # smtp.max_message_bytes is 200000 in tests
    dovecot.append(customer_mail("Small", "fits"))
    svc.start()
    wait_for(lambda: forwards(relay, "Small"), what="forward of the small message")
    wait_for(lambda: dovecot.count() == 0, what="inbox empty")
    assert dovecot.count("careservice-quarantine") == 1
    assert forwards(relay, "Huge") == []
    assert "imap_quarantined mailbox=" in svc.log.read_text()


def test_server_restart_reconnects(svc: Daemon, relay: CaptureRelay, dovecot: DovecotServer) -> None:
    svc.start()
    wait_idle(svc, dovecot)
    dovecot.stop()
    wait_for(lambda: imap_health(svc, mailbox_name(dovecot)).get("ok") is False, what="failure recorded")
    dovecot.start()
    dovecot.append(customer_mail("After restart", "back"))
    wait_for(lambda: forwards(relay, "After restart"), what="forward after the server came back")
    wait_for(lambda: imap_health(svc, mailbox_name(dovecot)).get("ok") is True, what="healthy again")


def test_polling_and_plain_expunge_without_idle_or_uidplus(tmp_path: Path, relay: CaptureRelay,
                                                          dovecot: DovecotServer) -> None:
    dovecot.stop()
    with dovecot.config.open("a") as conf:  # a server that offers neither IDLE nor UIDPLUS
        conf.write("protocol imap {\n  imap_capability = IMAP4rev1 LITERAL+\n}\n")
    dovecot.start()
    dovecot.append(customer_mail("Polled first", "one"))
    daemon = Daemon(imap_config(tmp_path / "svc", relay, dovecot, poll_seconds=1)).start()
    try:
        wait_for(lambda: forwards(relay, "Polled first"), what="first forward")
        dovecot.append(customer_mail("Polled second", "two"))
        wait_for(lambda: forwards(relay, "Polled second"), what="second forward")
        wait_for(lambda: dovecot.count() == 0, what="mailbox empty")
        assert "idle=False uidplus=False" in daemon.log.read_text()
    finally:
        daemon.stop()


def test_several_batches_are_taken_exactly_once(svc: Daemon, dovecot: DovecotServer) -> None:
    deliver_files(dovecot, many(2 * BATCH + 50, "Batch"))
    svc.start()
    wait_for(lambda: maildir_files(dovecot) == [], what="mailbox drained")
    assert taken(svc) == (2 * BATCH + 50, 0)



def test_mail_delivered_just_before_idle_is_taken_at_once(dovecot: DovecotServer) -> None:
    """The race between the last SEARCH and IDLE: Dovecot reports such mail only when the IDLE ends."""
    worker = MailboxWorker.__new__(MailboxWorker)  # only the IDLE wait is under test: no intake needed
    worker._stop = threading.Event()
    with dovecot.client() as client:
        client.select_folder("INBOX")
        assert client.search("ALL") == []
        dovecot.append(customer_mail("Just before IDLE", "race"))
        started = time.monotonic()
        with patch("careservice.intake.imap.IDLE_RENEW", 6.0):
            worker._idle(client, time.monotonic() + 6.0)
        assert time.monotonic() - started < 3.0  # before: the whole IDLE_RENEW
        assert len(client.search("ALL")) == 1


def test_the_envelope_recipient_is_the_topmost_header_the_provider_prepended() -> None:
    body = b"From: a@staff.example\r\nTo: care+x@ticketnest.test\r\nSubject: s\r\n\r\nDelivered-To: body@x.example\r\n"
    two = b"Delivered-To: Care+Tok@TicketNest.test\r\nDelivered-To: forged@ticketnest.test\r\n"
    assert envelope_recipient(two + body, "Delivered-To") == "care+tok@ticketnest.test"
    assert envelope_recipient(b"delivered-to:\r\n <care@ticketnest.test>\r\n" + body, "Delivered-To") == \
        "care@ticketnest.test"  # any case, folded, in angle brackets
    assert envelope_recipient(body, "Delivered-To") == ""  # the body is not the header
    too_long = b"Delivered-To: " + b"x" * 2000 + b"@ticketnest.test\r\n"
    assert envelope_recipient(too_long + b"Delivered-To: care+tok@ticketnest.test\r\n" + body, "Delivered-To") == ""
    assert envelope_recipient(b"Delivered-To: not an address\r\n" + body, "Delivered-To") == ""
    received = b"Received: from mx\r\nX-Original-To: care+tok@ticketnest.test\r\nDelivered-To: care@ticketnest.test\r\n"
    assert envelope_recipient(received + body, "X-Original-To") == "care+tok@ticketnest.test"
    assert envelope_recipient(received + body, "X.Original-To") == ""  # a name, not a pattern
    assert mailbox_envelope(body, "Envelope-To", CARE) == Envelope("a@staff.example", CARE)


def test_envelope_header_is_a_header_name(tmp_path: Path) -> None:
    table = '[[imap]]\nsite = "ticketnest"\nhost = "imap.example"\nusername = "u"\npassword_file = "p"\n'
    assert load_config(write_config(tmp_path, 1, extra=table)).imap[0].envelope_header == "Delivered-To"
    config = write_config(tmp_path, 1, extra=table + 'envelope_header = "X-Original-To"\n')
    assert load_config(config).imap[0].envelope_header == "X-Original-To"
    config = write_config(tmp_path, 1, extra=table + 'envelope_header = "Delivered-To:"\n')
    with pytest.raises(ConfigError, match="expected a header name") as raised:
        load_config(config)
    assert raised.value.key == "imap[0].envelope_header"
