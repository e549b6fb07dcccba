"""Spam checks in the daemon with a real rspamd on loopback: SMTP, the form, IMAP, staff replies, rspamd down."""

from __future__ import annotations

import asyncio
import re
import smtplib
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest

from careservice.crypto import Keyring
from careservice.crypto import load_master_key
from careservice.store import Store
from tests.conftest_rspamd import private_rspamd
from tests.dovecot import DovecotServer
from tests.rspamd import ADD_HEADER
from tests.rspamd import GREYLIST
from tests.rspamd import GTUBE
from tests.rspamd import SOFT_REJECT
from tests.rspamd import RspamdServer
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import holds
from tests.support import imap_config
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config
from tests.test_admin import admin_serving
from tests.test_admin import scrape
from tests.test_admin import value
from tests.test_spamcheck import ALICE
from tests.test_spamcheck import spam_table
from tests.webclient import VALID
from tests.webclient import behind_proxy
from tests.webclient import keeping_nothing
from tests.webclient import post
from tests.webclient import serving

pytestmark = pytest.mark.rspamd

BOB = "bob@customer.example"
MARKER = "zq-spam-marker-4471"  # in every refused message: no file may hold it afterwards


def arrives(predicate: Callable[[], object], seconds: float) -> bool:
    """Whether `predicate` becomes true within `seconds` (for what must not happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def forward_for(relay: CaptureRelay, subject: str) -> list[str]:
    return [str(c.message["Subject"]) for c in relay.to(STAFF) if subject in str(c.message["Subject"])]


def acks(relay: CaptureRelay, customer: str) -> list[object]:
    return [c for c in relay.to(customer) if c.message["Auto-Submitted"] == "auto-replied"]


def stored_raw(daemon: Daemon, subject: str, relay: CaptureRelay) -> bytes:
    """The raw message the store keeps for the case whose forward has `subject` (the daemon must be stopped)."""
    case_id = re.search(r"#([0-9a-f]{12})\]", forward_for(relay, subject)[0])
    assert case_id

    async def read_case() -> bytes:
        store = Store(daemon.data_dir, Keyring(load_master_key(daemon.config.parent / "master.key", create=False)))
        await store.start(sweep=False)
        try:
            case = await store.get_case(case_id.group(1))
        finally:
            await store.close()
        assert case is not None
        return case.message.raw

    return asyncio.run(read_case())


def spam_counts(daemon: Daemon) -> dict[str, float]:
    samples = scrape(admin_serving(daemon))  # the admin port opens last
    return {result: value(samples, "careservice_spam_checks_total", result=result)
            for result in ("reject", "suspect", "greylist", "ham", "unavailable")}


def assert_nothing_kept(daemon: Daemon) -> None:
    status = daemon.status()
    assert (status["open_cases"], status["inbound_pending"], status["outbound_queued"]) == (0, 0, 0)
    assert files_containing(daemon.data_dir, [MARKER.encode(), GTUBE]) == []


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory, rspamd: RspamdServer) -> Iterator[Daemon]:
    """One daemon with spam checks for the tests that send only refused mail."""
    yield from keeping_nothing(tmp_path_factory.mktemp("refusing"), spam_table(rspamd.url))


@pytest.mark.parametrize(("token", "code", "status", "result"), [
    (GTUBE, 550, b"5.7.1", "reject"), (GREYLIST, 451, b"4.7.1", "greylist"), (SOFT_REJECT, 451, b"4.7.1", "greylist"),
], ids=["gtube", "greylist", "soft-reject"])
def test_smtp_refuses_at_data_and_keeps_nothing(refusing: Daemon, token: bytes, code: int, status: bytes,
                                                result: str) -> None:
    before = spam_counts(refusing)[result]
    raw = customer_mail(f"Offer {MARKER}", f"Buy now {MARKER} {token.decode()}")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(refusing.smtp_port, ALICE, [CARE], raw)
    assert refused.value.smtp_code == code and refused.value.smtp_error.startswith(status)
    assert spam_counts(refusing)[result] == before + 1
    assert_nothing_kept(refusing)
    assert MARKER not in refusing.log.read_text() and ALICE not in refusing.log.read_text()


def test_rspamd_with_the_readmes_logging_keeps_no_sender_or_subject(refusing: Daemon, rspamd: RspamdServer) -> None:
    """rspamd's defaults log each scan with the Message-ID, client address and envelope: the README's logging.inc
    (tests/rspamd.py writes it) must leave none of them in rspamd's own logs."""
    message_id = "<zq-mid-5521@customer.example>"
    raw = customer_mail(f"Offer {MARKER}", f"Buy now {MARKER} {GTUBE.decode()}", message_id=message_id)
    with pytest.raises(smtplib.SMTPDataError):
        send(refusing.smtp_port, ALICE, [CARE], raw)
    logs = rspamd.logged()
    assert [word for word in (ALICE, MARKER, "zq-mid-5521") if word in logs] == []


def test_rspamd_with_the_readmes_config_logs_no_senders_domain(tmp_path: Path, relay: CaptureRelay,
                                                               rspamd: RspamdServer) -> None:
    """rspamd's default dkim_signing and arc modules sign mail from a local address (and authenticated mail) whose
    envelope and From domains agree: finding no key for the customer's domain, they log that domain at warning,
    which the README's logging level keeps. The README's local.d turns both off (tests/rspamd.py writes it): rspamd
    only checks what careservice hands it. From loopback, as a mail relayed by a host on rspamd's local networks."""
    sender = "zoe@zq-shop-7731.example"
    daemon = serving(Daemon(behind_proxy(write_config(tmp_path, relay.port, extra=spam_table(rspamd.url)))).start())
    try:
        send(daemon.smtp_port, sender, [CARE], customer_mail("Where are my tickets?", "Order 4711", sender=sender))
        assert post(daemon, {**VALID, "email": sender}).status == 303
        wait_for(lambda: len(relay.received) >= 4, what="both cases' forwards and acknowledgements")
    finally:
        daemon.stop()
    assert "zq-shop-7731" not in rspamd.logged()


@pytest.mark.parametrize("sender", ["zq..5521@odd-sender-5521.example", '"zq 5521"@odd-sender-5521.example'])
def test_a_sender_rspamd_cannot_read_is_not_told_it(tmp_path: Path, relay: CaptureRelay, rspamd: RspamdServer,
                                                    sender: str) -> None:
    """rspamd logs an envelope sender it cannot parse, whole and at error ('bad from header'), so no log level
    keeps it out: such a sender is not passed to it, and its mail is checked and taken all the same."""
    daemon = Daemon(write_config(tmp_path, relay.port, extra=spam_table(rspamd.url))).start()
    try:
        send(daemon.smtp_port, sender, [CARE], customer_mail("Odd sender", "Where are my tickets?"))
        wait_for(lambda: forward_for(relay, "Odd sender"), what="the forward")
        assert spam_counts(daemon)["ham"] == 1
    finally:
        daemon.stop()
    assert not holds(rspamd.logged(), "5521")


def test_a_form_post_rspamd_rejects_is_refused_and_not_kept(refusing: Daemon) -> None:
    reply = post(refusing, {**VALID, "query": f"Cheap {MARKER} {GTUBE.decode()}"})
    assert reply.status == 400
    assert "We could not accept this message" in reply.text
    assert MARKER in reply.text  # the customer's text is shown again, as after any refusal
    assert_nothing_kept(refusing)


def test_a_suspect_mail_is_opened_and_marked_for_the_stages(tmp_path: Path, relay: CaptureRelay,
                                                             rspamd: RspamdServer) -> None:
    daemon = Daemon(write_config(tmp_path, relay.port, extra=spam_table(rspamd.url))).start()
    try:
        send(daemon.smtp_port, ALICE, [CARE], customer_mail("Suspect one", f"Hi {ADD_HEADER.decode()}"))
        wait_for(lambda: forward_for(relay, "Suspect one"), what="forward of the suspect mail")
        assert spam_counts(daemon)["suspect"] == 1
    finally:
        daemon.stop()
    # from loopback rspamd checks no SPF or DMARC; the prefilter's action skipped the rest anyway
    assert stored_raw(daemon, "Suspect one", relay).startswith(
        b"X-Careservice-Spam: suspect; spf=unknown; dmarc=unknown\r\nFrom: ")


def test_a_suspect_mail_is_forwarded_tagged_and_not_acknowledged(tmp_path: Path, relay: CaptureRelay,
                                                                  rspamd: RspamdServer) -> None:
    daemon = Daemon(write_config(tmp_path, relay.port, extra=spam_table(rspamd.url))).start()
    try:
        send(daemon.smtp_port, ALICE, [CARE], customer_mail("Suspect two", f"Hi {ADD_HEADER.decode()}"))
        send(daemon.smtp_port, BOB, [CARE], customer_mail("Plain two", "Where are my tickets?", sender=BOB))
        wait_for(lambda: forward_for(relay, "Suspect two") and acks(relay, BOB), what="forwards and Bob's ack")
        assert "[spam?]" in forward_for(relay, "Suspect two")[0]
        assert "[spam?]" not in forward_for(relay, "Plain two")[0]
        assert not arrives(lambda: acks(relay, ALICE), 2.0)
    finally:
        daemon.stop()


@pytest.fixture
def stopped_rspamd(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of an rspamd that ran and was stopped."""
    server = private_rspamd(tmp_path_factory)
    server.stop()
    return server.url


def test_mail_is_taken_unchecked_when_rspamd_is_down(tmp_path: Path, relay: CaptureRelay,
                                                     stopped_rspamd: str) -> None:
    daemon = Daemon(write_config(tmp_path, relay.port, extra=spam_table(stopped_rspamd))).start()
    try:
        for n in (1, 2):
            send(daemon.smtp_port, ALICE, [CARE], customer_mail(f"Unchecked {n}", "Where are my tickets?"))
        wait_for(lambda: forward_for(relay, "Unchecked 1") and forward_for(relay, "Unchecked 2"), what="forwards")
        assert spam_counts(daemon)["unavailable"] == 2
        log = daemon.log.read_text()
        assert log.count("spam_check_unavailable") == 1
        assert "spam_check_unavailable reason=unreachable count=1" in log
    finally:
        daemon.stop()
    assert stored_raw(daemon, "Unchecked 2", relay).startswith(b"X-Careservice-Spam: unchecked\r\nFrom: ")


def test_mail_taken_unchecked_is_not_acknowledged(tmp_path: Path, relay: CaptureRelay, stopped_rspamd: str) -> None:
    daemon = Daemon(write_config(tmp_path, relay.port, extra=spam_table(stopped_rspamd))).start()
    try:
        send(daemon.smtp_port, ALICE, [CARE], customer_mail("Unchecked ack", "Where are my tickets?"))
        wait_for(lambda: forward_for(relay, "Unchecked ack"), what="forward")
        assert not arrives(lambda: acks(relay, ALICE), 5.0)
    finally:
        daemon.stop()


def test_a_staff_reply_is_not_checked(tmp_path: Path, relay: CaptureRelay, rspamd: RspamdServer) -> None:
    daemon = Daemon(write_config(tmp_path, relay.port, extra=spam_table(rspamd.url))).start()
    try:
        send(daemon.smtp_port, ALICE, [CARE], customer_mail("Lost tickets", "Order 4711 is lost"))
        wait_for(lambda: forward_for(relay, "Lost tickets"), what="forward")
        forward = relay.to(STAFF)[-1].message
        send(daemon.smtp_port, STAFF, [str(forward["Reply-To"])], staff_reply(forward, f"Reissued. {GTUBE.decode()}"))
        wait_for(lambda: [c for c in relay.to(ALICE) if GTUBE in c.raw], what="the answer relayed")
        assert sum(spam_counts(daemon).values()) == 1  # the customer's mail only
    finally:
        daemon.stop()


@pytest.mark.imap
def test_imap_spam_is_quarantined_and_greylisted_mail_stays(tmp_path: Path, relay: CaptureRelay,
                                                           dovecot: DovecotServer, rspamd: RspamdServer) -> None:
    dovecot.append(customer_mail(f"Offer {MARKER}", f"Buy {GTUBE.decode()}"))
    dovecot.append(customer_mail("Later please", f"Hi {GREYLIST.decode()}"))
    dovecot.append(customer_mail("Real question", "Where are my tickets?"))
    config = imap_config(tmp_path / "svc", relay, dovecot)
    config.write_text(config.read_text() + spam_table(rspamd.url))
    daemon = Daemon(config).start()
    try:
        wait_for(lambda: forward_for(relay, "Real question"), what="forward of the real question")
        wait_for(lambda: dovecot.count("careservice-quarantine") == 1 and dovecot.count() == 1,
                 what="spam quarantined, the greylisted message left")
        assert "imap_quarantined mailbox=" in daemon.log.read_text() and "reason=spam" in daemon.log.read_text()
        counts = spam_counts(daemon)
        assert (counts["reject"], counts["ham"]) == (1, 1) and counts["greylist"] >= 1  # checked again each pass
        assert forward_for(relay, "Offer") == [] and forward_for(relay, "Later") == []
    finally:
        daemon.stop()
    assert files_containing(daemon.data_dir, [MARKER.encode(), GTUBE]) == []
