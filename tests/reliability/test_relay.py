"""Relay faults: down for a while, scripted 4xx/5xx replies, no SMTPUTF8. Everything queued is
delivered once the relay is back, on the retry schedule; an answer the relay refuses for good gives
staff a notice naming only the case; no personal data reaches the log."""

from __future__ import annotations

import re
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.reliability.helpers import IDLE
from tests.reliability.helpers import SCALE
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import status
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

CUSTOMER = "relay.tester@customer.example"


class AsciiRelay(CaptureRelay):
    """A capture relay that does not offer SMTPUTF8 (like many smarthosts)."""

    def start(self) -> AsciiRelay:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=False)
        self._controller.start()
        return self


def case_id(forward: EmailMessage) -> str:
    match = re.search(r"#([0-9a-f]{12})\]", str(forward["Subject"]))
    assert match, forward["Subject"]
    return match.group(1)


def answers(relay: CaptureRelay, customer: str = CUSTOMER) -> list[EmailMessage]:
    return [c.message for c in relay.to(customer) if "Auto-Submitted" not in c.message]


def notices(relay: CaptureRelay) -> list[EmailMessage]:
    return [c.message for c in relay.to(STAFF) if "Auto-Submitted" in c.message]


def open_case(daemon: Daemon, relay: CaptureRelay, marker: str, customer: str = CUSTOMER) -> EmailMessage:
    before = len(relay.to(STAFF))
    raw = customer_mail(f"Subject {marker}", f"Body {marker}", sender=customer, name=f"Name {marker}")
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
        client.sendmail(customer, [CARE], raw, mail_options=[] if customer.isascii() else ["SMTPUTF8"])
    wait_for(lambda: len(relay.to(STAFF)) > before, what="forward")
    return relay.to(STAFF)[-1].message


def reply(daemon: Daemon, forward: EmailMessage, text: str) -> None:
    send(daemon.smtp_port, STAFF, [forward["Reply-To"].addresses[0].addr_spec], staff_reply(forward, text))


def test_relay_down_then_back_delivers_everything_once(tmp_path: Path, relay: CaptureRelay) -> None:
    relay.stop()
    daemon = Daemon(write_config(tmp_path, relay.port, retry_delays="[1, 1, 2]")).start()
    mails = 5 * SCALE
    markers = [f"outage-{i}-mark" for i in range(mails)]
    try:
        for marker in markers:
            send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail(f"Subject {marker}", f"Body {marker}",
                                                                   sender=CUSTOMER))
        wait_for(lambda: daemon.log.read_text().count("relay_down") >= 3, what="three failed probes")
        assert status(daemon)["outbound_queued"] == 3 * mails  # a forward per staff address (2) and an ack
        relay.start()
        wait_for(lambda: status(daemon)["outbound_queued"] == 0, timeout=60, what="queue drained")
        bodies = [c.message.get_body(("plain",)).get_content() for c in relay.to(STAFF)]
        per_marker = [sum(m in b for b in bodies) for m in markers]
        print(f"outage: sent={mails} accepted={mails} forwards={len(bodies)} lost={per_marker.count(0)} "
              f"duplicated={sum(n - 1 for n in per_marker if n > 1)} acks={len(relay.to(CUSTOMER))}")
        assert per_marker == [1] * mails
        assert len(relay.to(CUSTOMER)) == min(mails, 5)  # acks: at most 5 per address and hour
        delays = [int(d) for d in re.findall(rf"relay_down relay=127\.0\.0\.1:{relay.port} .* retry_in=(\d+)",
                                             daemon.log.read_text())]
        assert delays and all(d <= 2 for d in delays), delays  # the configured schedule, last delay repeating
        assert log_leaks(daemon, ["outage-", CUSTOMER]) == []
    finally:
        daemon.stop()


def test_scripted_4xx_replies_are_retried_until_delivered(tmp_path: Path, relay: CaptureRelay) -> None:
    relay.replies = ["451 4.3.0 try later", "421 4.3.2 busy", "450 4.2.0 mailbox busy"] * 2
    daemon = Daemon(write_config(tmp_path, relay.port, retry_delays="[1]")).start()
    try:
        for i in range(3):
            send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail(f"Retry {i}", f"retry-{i}-mark", sender=CUSTOMER))
        wait_for(lambda: status(daemon) == {**IDLE, "open_cases": 3}, timeout=60, what="queue drained")
        bodies = [c.message.get_body(("plain",)).get_content() for c in relay.to(STAFF)]
        assert [sum(f"retry-{i}-mark" in b for b in bodies) for i in range(3)] == [1, 1, 1]
        assert relay.replies == [] and relay.attempts == 6 + 9  # six refusals; 2 forwards and an ack per case
        assert "mail_failed" not in daemon.log.read_text()
    finally:
        daemon.stop()


def test_answer_refused_with_5xx_gives_staff_a_notice_naming_only_the_case(daemon: Daemon,
                                                                           relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, "refused-mark")
    wait_for(lambda: status(daemon)["outbound_queued"] == 0, what="forward and ack delivered")
    relay.replies = ["554 5.7.1 recipient refused"]
    reply(daemon, forward, "answer-platypus-mark")
    wait_for(lambda: notices(relay), what="staff notice")
    notice = notices(relay)[0]
    raw = relay.to(STAFF)[-1].raw
    assert case_id(forward) in str(notice["Subject"]) and "not be delivered" in str(notice["Subject"])
    assert not [n for n in (b"refused-mark", b"platypus", CUSTOMER.encode(), b"Name ") if n in raw]
    assert answers(relay) == []
    # open again, staff can answer once more; each staff member's notice delivered (they go one by one)
    wait_for(lambda: status(daemon) == {**IDLE, "open_cases": 1}, what="the case open and every notice delivered")
    reply(daemon, forward, "stale-answer-mark")  # the case was reopened under new reply addresses
    wait_for(lambda: len(notices(relay)) == 2, what="stale reply refused")
    assert "opened again" in notices(relay)[1].get_body(("plain",)).get_content() and answers(relay) == []
    reply(daemon, notice, "second-answer-mark")  # the notice carries the new one
    wait_for(lambda: answers(relay), what="second answer delivered")
    wait_for(lambda: status(daemon) == IDLE, what="purged after the answer")
    assert log_leaks(daemon, ["refused-mark", "platypus", "stale-answer", "second-answer", CUSTOMER]) == []


def test_answer_undeliverable_past_give_up_gives_a_notice(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = Daemon(write_config(tmp_path, relay.port, retry_delays="[1]", give_up_after=3)).start()
    try:
        forward = open_case(daemon, relay, "giveup-mark")
        wait_for(lambda: status(daemon)["outbound_queued"] == 0, what="forward and ack delivered")
        relay.stop()
        reply(daemon, forward, "late-answer-mark")
        wait_for(lambda: "mail_failed" in daemon.log.read_text(), what="answer given up")
        relay.start()
        wait_for(lambda: notices(relay), what="notice once the relay is back")
        assert answers(relay) == [] and case_id(forward) in str(notices(relay)[0]["Subject"])
        assert status(daemon)["open_cases"] == 1
    finally:
        daemon.stop()


def test_utf8_customer_address_is_forwarded_and_acknowledged(daemon: Daemon, relay: CaptureRelay) -> None:
    customer = "jos\u00e9@b\u00fccher.example"
    forward = open_case(daemon, relay, "utf8-mark", customer=customer)
    wait_for(lambda: relay.to(customer), what="ack over SMTPUTF8")
    reply(daemon, forward, "utf8-answer-mark")
    wait_for(lambda: len(relay.to(customer)) == 2, what="answer over SMTPUTF8")
    assert customer.encode() in relay.to(customer)[-1].raw  # To: in raw UTF-8 (RFC 6532)
    wait_for(lambda: status(daemon) == IDLE, what="purged")


def test_utf8_customer_with_an_ascii_only_relay_fails_once_not_forever(tmp_path: Path) -> None:
    relay = AsciiRelay().start()
    daemon = Daemon(write_config(tmp_path, relay.port, retry_delays="[1]")).start()
    try:
        customer = "jos\u00e9@customer.example"
        forward = open_case(daemon, relay, "ascii-relay-mark", customer=customer)
        refused = f"relay_refused relay=127.0.0.1:{relay.port} code=553 "
        wait_for(lambda: refused in daemon.log.read_text(), what="ack refused for good")
        reply(daemon, forward, "answer-mark")
        wait_for(lambda: notices(relay), what="staff notice for the answer")
        time.sleep(2)  # two more retry intervals: nothing is tried again
        log = daemon.log.read_text()
        assert log.count(refused) == 2 and log.count("permanent=true") == 2 and "outbox_round_failed" not in log
        assert status(daemon) == {**IDLE, "open_cases": 1} and relay.to(customer) == []
    finally:
        daemon.stop()
        relay.stop()
