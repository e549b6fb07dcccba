"""The case workflow end to end over real SMTP on loopback: forward, ack, answer, refuse, purge."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import pytest

from careservice.settings import StoreConfig
from tests.postgres import case_rows
from tests.postgres import run_sql
from tests.postgres import with_store
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import Captured
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config

CUSTOMER = "alice@customer.example"
IDLE = {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0}


@pytest.fixture
def config(tmp_path: Path, relay: CaptureRelay, store_backend: StoreConfig) -> Path:
    """Each test of the workflow runs on SQLite and on PostgreSQL."""
    return with_store(write_config(tmp_path, relay.port), store_backend)


def open_case(daemon: Daemon, relay: CaptureRelay, raw: bytes, sender: str = CUSTOMER) -> EmailMessage:
    """Send a customer mail; return the forward staff received."""
    before = len(relay.to(STAFF))
    send(daemon.smtp_port, sender, [CARE], raw)
    wait_for(lambda: len(relay.to(STAFF)) > before, what="forward to staff")
    return relay.to(STAFF)[-1].message


def answer_to(relay: CaptureRelay, customer: str = CUSTOMER) -> list[Captured]:
    return [c for c in relay.to(customer) if "Auto-Submitted" not in c.message]


def test_forward_carries_case_and_contact(daemon: Daemon, relay: CaptureRelay) -> None:
    raw = customer_mail("Lost tickets", "Order 4711 is lost")
    msg = EmailMessage()
    msg.set_content("see attachment")
    forward = open_case(daemon, relay, raw)
    captured = relay.to(STAFF)[0]
    assert captured.rcpt_tos == [STAFF]  # each staff address gets its own copy (own reply address)
    wait_for(lambda: relay.to(STAFF2), what="the second staff member's copy")  # its own relay connection
    assert relay.to(STAFF2)[0].message["Reply-To"] != forward["Reply-To"]
    assert forward["From"].addresses[0].display_name == "Alice Example via TicketNest"
    assert forward["From"].addresses[0].addr_spec == CARE
    reply_to = forward["Reply-To"].addresses[0].addr_spec
    assert reply_to.startswith("care+") and reply_to.endswith("@ticketnest.test")
    assert str(forward["Message-ID"]).endswith("@ticketnest.test>")
    body = forward.get_body(("plain",)).get_content()
    assert "Order 4711 is lost" in body and CUSTOMER in body and "Alice Example" in body
    assert "Lost tickets" in str(forward["Subject"])


def test_attachments_reach_staff(daemon: Daemon, relay: CaptureRelay) -> None:
    msg = EmailMessage()
    msg["From"] = f"Alice <{CUSTOMER}>"
    msg["To"] = CARE
    msg["Subject"] = "Receipt"
    msg["Message-ID"] = "<att-1@customer.example>"
    msg.set_content("My receipt is attached")
    msg.add_attachment(b"%PDF-1.4 receipt bytes", maintype="application", subtype="pdf", filename="receipt.pdf")
    forward = open_case(daemon, relay, bytes(msg))
    attachments = list(forward.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["receipt.pdf"]
    assert attachments[0].get_content() == b"%PDF-1.4 receipt bytes"


def test_ack_is_automatic_and_does_not_echo(daemon: Daemon, relay: CaptureRelay) -> None:
    raw = customer_mail("Subject spamword", "Body spamtext", message_id="<m1@customer.example>")
    open_case(daemon, relay, raw)
    wait_for(lambda: relay.to(CUSTOMER), what="ack")
    captured = relay.to(CUSTOMER)[0]
    ack = captured.message
    assert captured.mail_from == ""
    assert ack["From"].addresses[0].addr_spec == CARE
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["In-Reply-To"] == "<m1@customer.example>"
    assert b"spamword" not in captured.raw and b"spamtext" not in captured.raw and b"Alice" not in captured.raw


@pytest.mark.parametrize(("sender", "name", "headers"), [
    ("", "Alice", {}),
    (CUSTOMER, "Alice", {"Auto-Submitted": "auto-replied"}),
    (CUSTOMER, "Alice", {"Precedence": "bulk"}),
    (CUSTOMER, "Alice", {"Precedence": "junk"}),
    (CUSTOMER, "Alice", {"Precedence": "list"}),
    (CUSTOMER, "Alice", {"List-Id": "<news.example.org>"}),
    ("MAILER-DAEMON@mx.example", "Mail Delivery System", {}),
    ("postmaster@mx.example", "Postmaster", {}),
    (CARE, "TicketNest", {}),
    (CUSTOMER, "Alice", {"X-Careservice-Loop": "care.test"}),
])
def test_automatic_mail_opens_no_case_and_gets_no_ack(daemon: Daemon, relay: CaptureRelay, sender: str, name: str,
                                                      headers: dict[str, str]) -> None:
    raw = customer_mail("Auto", "automatic text", sender=sender or "mailer-daemon@mx.example", name=name,
                        headers=headers)
    send(daemon.smtp_port, sender, [CARE], raw)
    wait_for(lambda: "discard_" in daemon.log.read_text(), what="discard")
    # a real mail afterwards goes through, so the automatic one was not merely slow
    open_case(daemon, relay, customer_mail("Real", "real text", sender="bob@customer.example", name="Bob"),
              sender="bob@customer.example")
    assert len(relay.to(STAFF)) == 1 and "Real" in str(relay.to(STAFF)[0].message["Subject"])
    wait_for(lambda: relay.to("bob@customer.example"), what="ack to the real mail")
    assert relay.to(CUSTOMER) == [] and relay.to(CARE) == []
    assert daemon.status()["open_cases"] == 1


@pytest.mark.parametrize("tagged", [False, True], ids=["one-address", "plus-tags"])
def test_acks_are_rate_limited_per_address(daemon: Daemon, relay: CaptureRelay, tagged: bool) -> None:
    """Seven mails from one address, or (as an attacker would aim acks at a victim) from its +tags."""
    senders = [f"alice+{i}@customer.example" if tagged else CUSTOMER for i in range(7)]
    for i, sender in enumerate(senders):
        open_case(daemon, relay, customer_mail(f"Case {i}", f"text {i}", sender=sender), sender=sender)
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="queue drained")
    assert len(relay.to(STAFF)) == 7
    assert len([c for c in relay.received if c.rcpt_tos[0].endswith("@customer.example")]) == 5


def test_follow_up_joins_the_open_case(daemon: Daemon, relay: CaptureRelay) -> None:
    first = open_case(daemon, relay, customer_mail("Refund", "Please refund 4711"))
    wait_for(lambda: relay.to(CUSTOMER), what="ack")
    ack = relay.to(CUSTOMER)[0].message
    follow = customer_mail("Re: ack", "I forgot: order 4712 too", headers={"In-Reply-To": str(ack["Message-ID"])})
    second = open_case(daemon, relay, follow)
    assert second["Reply-To"] == first["Reply-To"]
    assert "order 4712 too" in second.get_body(("plain",)).get_content()
    assert daemon.status()["open_cases"] == 1
    assert len(relay.to(CUSTOMER)) == 1  # no second ack


def test_genuine_answer_is_relayed_and_case_purged(daemon: Daemon, relay: CaptureRelay,
                                                   store_backend: StoreConfig) -> None:
    raw = customer_mail("Refund zebra", "Body quokka please", sender="marker.person@customer.example",
                        name="Wilhelmina Markername", message_id="<orig-1@customer.example>")
    forward = open_case(daemon, relay, raw, sender="marker.person@customer.example")
    reply = staff_reply(forward, "Your refund platypus is on its way.\n\nBest, Agent Smith <agent@staff.example>")
    send(daemon.smtp_port, STAFF, [forward["Reply-To"].addresses[0].addr_spec], reply)
    wait_for(lambda: answer_to(relay, "marker.person@customer.example"), what="answer")
    captured = answer_to(relay, "marker.person@customer.example")[0]
    answer = captured.message
    assert captured.mail_from == CARE
    assert answer["From"].addresses[0].addr_spec == CARE
    assert str(answer["Subject"]) == "Re: Refund zebra"
    assert answer["In-Reply-To"] == "<orig-1@customer.example>"
    text = answer.get_body(("plain",)).get_content()
    assert "platypus" in text and "quokka" not in text
    assert not [line for line in text.splitlines() if line.startswith(">")]
    assert b"staff.example" not in captured.raw, captured.raw.decode()
    wait_for(lambda: daemon.status() == IDLE, what="purge")
    assert case_rows(store_backend, daemon.data_dir) == 0  # nothing of the case in either database
    needles = [b"marker.person", b"Wilhelmina", b"Markername", b"zebra", b"quokka", b"platypus"]
    assert files_containing(daemon.data_dir, needles) == []
    assert not [n for n in needles if n in daemon.log.read_bytes()]
    wal = daemon.data_dir / "cases.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0 or b"quokka" not in wal.read_bytes()


def test_forged_from_is_not_relayed_and_not_answered(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Refund", "please"))
    forged = staff_reply(forward, "Send your card number to evil.example", sender="evil@attacker.example")
    send(daemon.smtp_port, "evil@attacker.example", [forward["Reply-To"].addresses[0].addr_spec], forged)
    wait_for(lambda: "reply_not_from_staff" in daemon.log.read_text(), what="refusal")
    assert answer_to(relay) == [] and relay.to("evil@attacker.example") == []
    assert daemon.status()["open_cases"] == 1


def test_tampered_token_gets_a_notice_to_staff_only(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Refund", "please"))
    good = forward["Reply-To"].addresses[0].addr_spec
    local, domain = good.split("@")
    bad = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    send(daemon.smtp_port, STAFF, [bad], staff_reply(forward, "Answer text", to=bad))
    wait_for(lambda: [c for c in relay.to(STAFF) if "not sent" in str(c.message["Subject"])], what="notice")
    assert answer_to(relay) == []
    assert daemon.status()["open_cases"] == 1


def test_closed_marker_closes_without_mail(daemon: Daemon, relay: CaptureRelay, store_backend: StoreConfig) -> None:
    forward = open_case(daemon, relay, customer_mail("Call me", "please call 0123"))
    reply = staff_reply(forward, "#closed\nCalled her, all fine.")
    send(daemon.smtp_port, STAFF, [forward["Reply-To"].addresses[0].addr_spec], reply)
    wait_for(lambda: daemon.status()["open_cases"] == 0, what="closed")
    assert answer_to(relay) == []
    names = {r[0] for r in run_sql(store_backend, daemon.data_dir, "SELECT name FROM stats")}
    assert {"opened", "closed_by_phone"} <= names


def test_late_reply_gets_already_answered_notice(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Refund", "please"))
    address = forward["Reply-To"].addresses[0].addr_spec
    send(daemon.smtp_port, STAFF, [address], staff_reply(forward, "First answer"))
    wait_for(lambda: answer_to(relay), what="first answer")
    wait_for(lambda: daemon.status()["open_cases"] == 0, what="purge")
    send(daemon.smtp_port, STAFF2, [address], staff_reply(forward, "Second answer", sender=STAFF2))
    wait_for(lambda: [c for c in relay.to(STAFF2) if "Already answered" in str(c.message["Subject"])],
             what="late notice")
    assert len(answer_to(relay)) == 1


def test_staff_out_of_office_is_not_relayed(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Refund", "please"))
    address = forward["Reply-To"].addresses[0].addr_spec
    ooo = staff_reply(forward, "I am on holiday until Monday")
    ooo = ooo.replace(b"Subject:", b"Auto-Submitted: auto-replied\r\nSubject:", 1)
    send(daemon.smtp_port, STAFF, [address], ooo)
    wait_for(lambda: "discard_auto_submitted" in daemon.log.read_text(), what="discard")
    assert answer_to(relay) == []
    assert daemon.status()["open_cases"] == 1


def test_unanswered_case_expires_with_notice_and_its_reply_address_with_it(daemon: Daemon, relay: CaptureRelay,
                                                                            store_backend: StoreConfig) -> None:
    forward = open_case(daemon, relay, customer_mail("Old", "nobody answers"))
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="queue drained")
    # retention.unanswered_days passed
    run_sql(store_backend, daemon.data_dir, "UPDATE cases SET next_run = 0, created = created - 31 * 86400")
    wait_for(lambda: [c for c in relay.to(STAFF) if "Expired" in str(c.message["Subject"])], what="expiry notice")
    wait_for(lambda: daemon.status() == IDLE, what="purge")
    send(daemon.smtp_port, STAFF, [forward["Reply-To"].addresses[0].addr_spec], staff_reply(forward, "Too late"))
    wait_for(lambda: [c for c in relay.to(STAFF) if "Already answered" in str(c.message["Subject"])],
             what="the expired case's reply address refused")
    assert answer_to(relay) == []
    assert files_containing(daemon.data_dir, [b"nobody answers", b"Too late"]) == []
