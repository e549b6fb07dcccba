"""Staff replies that must not reach the customer at all, with the case left open and staff told why
by a notice that names the case only: a reply the parser cannot read whole (it used to go out as a
raw original.eml with the staff member's address, the reply token and their Received line), one
with a mail or one of our reply addresses attached, and one from an address not on the staff list."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from email import message_from_bytes
from email import policy
from email.message import EmailMessage

import pytest

from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import shared_daemon
from tests.reliability.mailclients import STAFF_IP
from tests.reliability.mailclients import reply_headers
from tests.reliability.mailclients import thunderbird
from tests.reliability.replycase import answers
from tests.reliability.replycase import case_id
from tests.reliability.replycase import case_state
from tests.reliability.replycase import notices
from tests.reliability.replycase import open_case
from tests.reliability.replycase import reply_address
from tests.reliability.replycase import reply_to
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, CaptureRelay]]:
    yield from shared_daemon(tmp_path_factory, "reply-refusals")


def head(forward: EmailMessage) -> str:
    return "".join(f"{k}: {v}\n" for k, v in reply_headers(forward, STAFF).items()) + "MIME-Version: 1.0\n"


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def nested(forward: EmailMessage, depth: int) -> bytes:
    """A reply whose answer sits `depth` multiparts deep."""
    body = "".join(f'Content-Type: multipart/mixed; boundary="n{i}"\n\n--n{i}\n' for i in range(depth))
    body += "Content-Type: text/plain\n\nDeep answer\n" + "".join(f"--n{i}--\n" for i in reversed(range(depth)))
    return crlf(head(forward) + body)


def many_parts(forward: EmailMessage, count: int) -> bytes:
    parts = "".join(f"--p\nContent-Type: text/plain\n\nPart {i} of the answer\n" for i in range(count))
    return crlf(head(forward) + f'Content-Type: multipart/mixed; boundary="p"\n\n{parts}--p--\n')


def with_attachment(forward: EmailMessage, data: bytes | EmailMessage, ctype: str = "") -> bytes:
    msg = EmailMessage()
    msg.set_content("Please find the details attached.")
    if isinstance(data, EmailMessage):
        msg.add_attachment(data)  # message/rfc822: Outlook's "Attach item", Thunderbird's "Forward as attachment"
    else:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename="details")
    for name, value in reply_headers(forward, STAFF).items():
        msg[name] = value
    return msg.as_bytes(policy=policy.SMTP)


def as_relayed(relay: CaptureRelay, forward: EmailMessage) -> EmailMessage:
    """The forward exactly as staff got it, Reply-To and all."""
    raw = next(c.raw for c in relay.to(STAFF) if c.message["Message-ID"] == forward["Message-ID"])
    return message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


REPLIES: dict[str, Callable[[EmailMessage, CaptureRelay], bytes]] = {
    "nested_25_deep": lambda f, _: nested(f, 25),
    "parts_250": lambda f, _: many_parts(f, 250),
    "forward_attached": lambda f, relay: with_attachment(f, as_relayed(relay, f)),
    "reply_address_attached": lambda f, _: with_attachment(f, f"Reply-To: {reply_address(f)}".encode(), "text/plain"),
    "reply_address_in_outlook_item": lambda f, _: with_attachment(
        f, b"\xd0\xcf\x11\xe0" + f"Reply-To: {reply_address(f)}".encode("utf-16-le"), "application/vnd.ms-outlook"),
}


@pytest.mark.parametrize("kind", sorted(REPLIES))
def test_the_reply_is_not_relayed_the_staff_member_is_told_and_the_case_stays_open(
        shared: tuple[Daemon, CaptureRelay], kind: str) -> None:
    daemon, relay = shared
    customer = f"refused-{kind.replace('_', '-')}@customer.example"
    forward = open_case(daemon, relay, customer)
    reply_to(forward, REPLIES[kind](forward, relay), daemon)
    assert answers(relay, customer) == []
    assert not [c for c in relay.to(customer) if STAFF_IP.encode() in c.raw or b"care+" in c.raw]
    [notice] = notices(relay, STAFF, case_id(forward))
    assert "not sent" in str(notice["Subject"]) and STAFF_IP.encode() not in bytes(notice)
    assert case_state(daemon, case_id(forward)) == "open"


def test_a_reply_from_an_address_not_on_the_staff_list_is_reported_to_the_staff(
        shared: tuple[Daemon, CaptureRelay]) -> None:
    daemon, relay = shared
    customer = "from-an-alias@customer.example"
    alias = "agent.smith.alias@staff.example"
    forward = open_case(daemon, relay, customer)
    reply_to(forward, thunderbird(forward, "Alias answer zebracorn", sender=alias), daemon, sender=alias)
    assert answers(relay, customer) == [] and relay.to(alias) == []
    for staff in (STAFF, STAFF2):
        [notice] = notices(relay, staff, case_id(forward))
        assert "sender" in str(notice["Subject"])
        assert b"alias" not in bytes(notice) and b"zebracorn" not in bytes(notice)
    assert case_state(daemon, case_id(forward)) == "open"


def test_nothing_personal_in_the_log(shared: tuple[Daemon, CaptureRelay]) -> None:
    assert log_leaks(shared[0], ["@customer.example", "staff.example", STAFF_IP, "Deep answer", "zebracorn"]) == []
