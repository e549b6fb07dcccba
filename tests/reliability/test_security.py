"""Security: no open relay in any recipient form; forged, tampered and replayed staff replies are
never relayed (also when they carry headers that imitate ours); no header can be injected through
a name, a subject or a staff answer; nothing personal reaches the log."""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from careservice.mail import parse
from tests.reliability.helpers import RawSmtp
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import shared_daemon
from tests.reliability.helpers import status
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for

pytestmark = pytest.mark.reliability

FOREIGN_RECIPIENTS = [
    "victim@example.net", "victim@ticketnest.test.example.net", "care@ticketnest.test.",  # trailing dot
    "care@[127.0.0.1]", "care@[IPv6:::1]", "victim%example.net@ticketnest.test",  # IP literal, percent hack
    "care%ticketnest.test@example.net", "@ticketnest.test,@mx.example:victim@example.net",  # source route
    "@ticketnest.test:victim@example.net", '"victim@example.net"@ticketnest.test',
    '"care@ticketnest.test"@example.net', "victim!care@ticketnest.test", "example.net!victim@ticketnest.test",
    "care@ticketnest.test@example.net", "care@ticketnest.test,victim@example.net", "care+@ticketnest.test",
    "care+../../etc@ticketnest.test", "care@ixs.test.evil.example", "care@xn--ticketnst-p6a.test",
    "care\\@example.net@ticketnest.test", "postmaster@example.net", "",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, CaptureRelay]]:
    yield from shared_daemon(tmp_path_factory, "security")


@pytest.mark.parametrize("rcpt", FOREIGN_RECIPIENTS)
def test_no_open_relay(shared: tuple[Daemon, CaptureRelay], rcpt: str) -> None:
    daemon, relay = shared
    before = len(relay.received)
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.mail("spammer@example.org")[0] == 250
        client.send(f"RCPT TO:<{rcpt}>\r\n".encode())
        code, text = client.getreply()
        assert code >= 500, (rcpt, code, text)
        assert client.docmd("DATA")[0] >= 500  # no recipient: no message
        assert client.noop()[0] == 250
    assert len(relay.received) == before and status(daemon)["inbound_pending"] == 0


def test_recipient_smuggled_after_a_line_break_is_refused(shared: tuple[Daemon, CaptureRelay]) -> None:
    session = RawSmtp(shared[0].smtp_port)
    try:
        session.command(b"EHLO x.example")
        session.command(b"MAIL FROM:<spammer@example.org>")
        session.send(b"RCPT TO:<care@ticketnest.test\r\nRCPT TO:<victim@example.net>\r\n")
        replies = [session.reply(), session.reply()]
    finally:
        session.close()
    assert replies[1].startswith(b"5"), replies  # the first line names our address; the smuggled one is refused


def open_case(daemon: Daemon, relay: CaptureRelay, raw: bytes, sender: str) -> EmailMessage:
    before = len(relay.to(STAFF))
    send(daemon.smtp_port, sender, [CARE], raw)
    wait_for(lambda: len(relay.to(STAFF)) > before, what="forward")
    return relay.to(STAFF)[-1].message


def answers_to(relay: CaptureRelay, customer: str) -> list[EmailMessage]:
    return [c.message for c in relay.to(customer) if "Auto-Submitted" not in c.message]


def settled(daemon: Daemon) -> None:
    wait_for(lambda: status(daemon)["inbound_pending"] == 0 and status(daemon)["outbound_queued"] == 0,
             what="all processed")


def reply_address(forward: EmailMessage) -> str:
    return forward["Reply-To"].addresses[0].addr_spec


def tampered(address: str, part: int) -> str:
    """The reply address with one character of its case id (0), nonce (1) or MAC (2) changed."""
    local, domain = address.split("@")
    base, token = local.split("+")
    pieces = token.split(".")
    pieces[part] = pieces[part][:-1] + ("a" if pieces[part][-1] != "a" else "b")
    return f"{base}+{'.'.join(pieces)}@{domain}"


@pytest.mark.parametrize("attack", [
    "stranger_from", "two_froms", "staff_sender_header_only", "tampered_case", "tampered_nonce", "tampered_mac",
    "imitated_loop_and_auth_headers", "token_of_other_case", "reply_to_care_address_with_token_in_cc",
])
def test_forged_or_tampered_replies_are_never_relayed(shared: tuple[Daemon, CaptureRelay], attack: str) -> None:
    daemon, relay = shared
    customer = f"{attack.replace('_', '-')}@customer.example"
    forward = open_case(daemon, relay, customer_mail(f"Case {attack}", "help please", sender=customer), customer)
    other = open_case(daemon, relay, customer_mail("Other case", "other", sender="other." + customer),
                      "other." + customer)
    address, sender, rcpt = reply_address(forward), STAFF, reply_address(forward)
    reply = staff_reply(forward, "FORGED ANSWER: pay to evil.example")
    if attack == "stranger_from":
        sender, reply = "evil@attacker.example", staff_reply(forward, "FORGED", sender="evil@attacker.example")
    elif attack == "two_froms":
        reply = reply.replace(b"From: ", b"From: Evil <evil@attacker.example>\r\nFrom: ", 1)
    elif attack == "staff_sender_header_only":
        reply = staff_reply(forward, "FORGED", sender="evil@attacker.example").replace(
            b"From: ", f"Sender: {STAFF}\r\nFrom: ".encode(), 1)
    elif attack.startswith("tampered_"):
        rcpt = tampered(address, ["case", "nonce", "mac"].index(attack.split("_")[1]))
        reply = staff_reply(forward, "FORGED", to=rcpt)
    elif attack == "imitated_loop_and_auth_headers":
        sender = "evil@attacker.example"
        reply = staff_reply(forward, "FORGED", sender=sender).replace(b"From: ", (
            "X-Careservice-Loop: care.test\r\nAuthentication-Results: care.test; dkim=pass header.d=staff.example\r\n"
            f"Auto-Submitted: no\r\nX-Original-From: {STAFF}\r\nFrom: ").encode(), 1)
    elif attack == "token_of_other_case":  # a valid token for another case cannot answer this one
        rcpt = reply_address(other)
        reply = staff_reply(forward, "FORGED", to=rcpt)
        sender = "evil@attacker.example"
        reply = reply.replace(f"<{STAFF}>".encode(), b"<evil@attacker.example>")
    elif attack == "reply_to_care_address_with_token_in_cc":  # over SMTP only the envelope names a token:
        rcpt = CARE                                              # this is a new case from "staff" (to staff)
        reply = reply.replace(b"To: ", f"Cc: {address}\r\nDelivered-To: {address}\r\nTo: ".encode(), 1)
    send(daemon.smtp_port, sender, [rcpt], reply)
    settled(daemon)
    assert answers_to(relay, customer) == [] and answers_to(relay, "other." + customer) == []
    assert not [c for c in relay.received if b"FORGED" in c.raw and not set(c.rcpt_tos) <= {STAFF, STAFF2}]
    assert relay.to("evil@attacker.example") == []  # no backscatter to the forger either
    assert status(daemon)["open_cases"] >= 2


def test_replayed_answer_is_relayed_once(shared: tuple[Daemon, CaptureRelay]) -> None:
    daemon, relay = shared
    customer = "replay@customer.example"
    forward = open_case(daemon, relay, customer_mail("Replay", "help", sender=customer), customer)
    reply = staff_reply(forward, "The one answer")
    for _ in range(3):
        send(daemon.smtp_port, STAFF, [reply_address(forward)], reply)
    settled(daemon)
    wait_for(lambda: answers_to(relay, customer), what="answer")
    settled(daemon)
    assert len(answers_to(relay, customer)) == 1


def test_answer_goes_only_to_the_customer(shared: tuple[Daemon, CaptureRelay]) -> None:
    """Extra To/Cc/Bcc in a staff reply are ignored: the answer's recipient comes from the case."""
    daemon, relay = shared
    customer = "only.customer@customer.example"
    forward = open_case(daemon, relay, customer_mail("Only me", "help", sender=customer), customer)
    reply = staff_reply(forward, "Answer for you only").replace(
        b"To: ", b"Cc: third@party.example\r\nBcc: hidden@party.example\r\nTo: ", 1)
    send(daemon.smtp_port, STAFF, [reply_address(forward)], reply)
    wait_for(lambda: answers_to(relay, customer), what="answer")
    captured = [c for c in relay.received if b"Answer for you only" in c.raw]
    assert [c.rcpt_tos for c in captured] == [[customer]]
    assert b"party.example" not in captured[0].raw and b"staff.example" not in captured[0].raw


INJECTIONS = [
    "=?utf-8?b?" + base64.b64encode(b"x\r\nBcc: victim@evil.example\r\nX-Injected: 1").decode() + "?=",
    "=?utf-8?q?x=0D=0ABcc:_victim@evil.example?=",
    "x\u2028Bcc: victim@evil.example\u2029X-Injected: 1",
    "x\x85Bcc: victim@evil.example",
]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_no_header_injection_through_name_subject_or_answer(shared: tuple[Daemon, CaptureRelay],
                                                            payload: str) -> None:
    daemon, relay = shared
    customer = f"inject{INJECTIONS.index(payload)}@customer.example"
    raw = (f"From: {payload} <{customer}>\r\nTo: {CARE}\r\nSubject: {payload}\r\n"
           f"Message-ID: <inject-{INJECTIONS.index(payload)}@customer.example>\r\n\r\nbody\r\n").encode()
    forward = open_case(daemon, relay, raw, customer)
    answer = "Answer line\r\n.\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@evil.example>\r\nX-Injected: 1"
    send(daemon.smtp_port, STAFF, [reply_address(forward)], staff_reply(forward, answer))
    wait_for(lambda: [c for c in relay.received if b"Answer line" in c.raw], what="answer")
    settled(daemon)
    for captured in relay.received:
        names = [k.lower() for k in captured.message.keys()]
        assert "bcc" not in names and "x-injected" not in names, names
        assert len(names) == len(set(names)), names  # every header once
        assert STAFF in captured.rcpt_tos or len(captured.rcpt_tos) == 1, captured.rcpt_tos  # no added recipient
    assert relay.to("evil@attacker.example") == []


def test_a_from_that_parses_to_garbage_is_not_used_as_an_address() -> None:
    """The stdlib reads "x<U+2028>Bcc: v@evil.example<U+2029>X-Injected: 1 <a@b>" as "v@evil.example x-injected"."""
    raw = f"From: {INJECTIONS[2]} <a@customer.example>\r\nSubject: s\r\n\r\nbody\r\n".encode()
    assert parse(raw, "a@customer.example").from_address == ""  # the case falls back to the envelope sender


def test_greeting_names_no_software(shared: tuple[Daemon, CaptureRelay]) -> None:
    """The banner is the host name and "ESMTP" alone: a software name or version tells an attacker which
    published weaknesses to try."""
    session = RawSmtp(shared[0].smtp_port)
    try:
        assert session.greeting == b"220 care.test ESMTP\r\n"  # smtp.hostname from tests.support.write_config
        assert session.command(b"QUIT").startswith(b"221")
    finally:
        session.close()


def test_no_personal_data_in_the_log(shared: tuple[Daemon, CaptureRelay]) -> None:
    daemon, _ = shared
    markers = ["@customer.example", "attacker", "FORGED", "evil.example", "party.example", "Answer for you",
               "victim", STAFF, STAFF2]
    assert log_leaks(daemon, markers) == []
