"""HTML over real SMTP on loopback: a staff member's HTML answer reaches the customer as
multipart/alternative without the quote, anything remote or a staff or reply address; a customer's
HTML mail reaches staff as readable text with the HTML attached. And the Date header of what careservice
renders."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email import message_from_bytes
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from email.utils import localtime
from email.utils import parsedate_to_datetime
from pathlib import Path

import dkim
import pytest

from careservice import mail
from careservice.dkim import Signer
from careservice.dkim import SiteKey
from careservice.dkim import txt_record
from careservice.dkim import write_key
from careservice.htmlpart import own_html
from careservice.mail import Attachment
from careservice.mail import Draft
from careservice.mail import render
from tests.reliability.mailclients import gmail
from tests.reliability.mailclients import outlook
from tests.support import CARE
from tests.support import STAFF
from tests.support import Captured
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import files_containing
from tests.support import send
from tests.support import wait_for
from tests.test_workflow import answer_to
from tests.test_workflow import open_case

CUSTOMER = "marker.person@customer.example"
NEEDLES = [b"marker.person", b"Wilhelmina", b"Markername", b"zebra", b"quokka", b"platypus"]


def customer_html_mail(subject: str, html: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Wilhelmina Markername <{CUSTOMER}>"
    msg["To"] = CARE
    msg["Subject"] = subject
    msg["Message-ID"] = "<html-1@customer.example>"
    msg.set_content(html, subtype="html")
    return msg.as_bytes(policy=policy.SMTP)


def staff_html(reply_address: str) -> str:
    """What a staff member's editor wrote: a link, and things that must not reach the customer."""
    return (
        '<div>Dear Wilhelmina,</div><div><br></div>'
        '<div>your refund platypus is on its way: see <a href="https://tickets.example/refund">the refund page</a>'
        '.</div><script>alert("x")</script><style>div { background: url(https://tracker.example/s.png) }</style>'
        f'<div>Questions? Write to <a href="mailto:{reply_address}" title="{reply_address}">us</a>.</div>'
        '<div style="color:#333;background-image:url(https://tracker.example/b.png)">Kind regards,<br>Agent Smith '
        '<a href="mailto:agent%40staff.example">agent@staff.example</a></div>'
        '<img src="https://tracker.example/pixel.gif" width="1" height="1">'
        '<img src="http://tracker.example/logo.png" alt="logo">'
    )


TEXT = "Dear Wilhelmina,\n\nyour refund platypus is on its way.\n\nKind regards,\nAgent Smith"
CLIENTS: dict[str, Callable[[EmailMessage, str], bytes]] = {
    "gmail": lambda forward, html: gmail(forward, TEXT, html=html),
    "outlook": lambda forward, html: outlook(forward, TEXT, html=html),
    "outlook_html_only": lambda forward, html: outlook(forward, "", html=html, text_part=False),
}


def purged(daemon: Daemon) -> None:
    wait_for(lambda: daemon.status() == {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0},
             what="purge")
    assert files_containing(daemon.data_dir, NEEDLES) == []
    assert not [n for n in NEEDLES if n in daemon.log.read_bytes()]


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_an_html_answer_goes_as_alternative_without_quote_or_remote_content(daemon: Daemon, relay: CaptureRelay,
                                                                            client: str) -> None:
    raw = customer_html_mail("Refund zebra", "<p>Body quokka please</p>")
    forward = open_case(daemon, relay, raw, sender=CUSTOMER)
    reply_address = forward["Reply-To"].addresses[0].addr_spec
    send(daemon.smtp_port, STAFF, [reply_address], CLIENTS[client](forward, staff_html(reply_address)))
    wait_for(lambda: answer_to(relay, CUSTOMER), what="answer")
    captured: Captured = answer_to(relay, CUSTOMER)[0]
    answer = captured.message
    assert answer.get_content_type() == "multipart/alternative"
    text = answer.get_body(("plain",)).get_content()
    html = answer.get_body(("html",)).get_content()
    for part in (text, html):
        assert "platypus" in part and "Kind regards" in part
        assert "quokka" not in part and "zebra" not in part  # the quote: the forward and the customer's text
        assert "New message for" not in part and "Press Reply" not in part and "wrote:" not in part
        assert "staff.example" not in part and reply_address not in part and "care+" not in part
        assert "tracker.example" not in part and "alert(" not in part
    assert "the refund page <https://tickets.example/refund>" in text
    assert '<a href="https://tickets.example/refund">the refund page</a>' in html
    assert f'href="mailto:{CARE}"' in html
    assert not re.search(r"<img[^>]*src=[\"']?https?:", html, re.IGNORECASE)
    assert "<script" not in html.lower() and "<style" not in html.lower() and "url(" not in html.lower()
    assert "TicketNest Customer Care" in html  # the answer template frames both parts
    assert b"staff.example" not in captured.raw and b"tracker.example" not in captured.raw
    purged(daemon)


def test_a_customer_html_mail_reaches_staff_as_text_with_the_html_attached(daemon: Daemon,
                                                                            relay: CaptureRelay) -> None:
    html = ("<html><head><title>quokka title</title><style>p { color: red } .hidden { display: none }</style>"
            "<script>var zebra = 1;</script></head><body>"
            "<p>My order 4711 never arrived.</p><p>See <a href=\"https://tickets.example/order/4711\">my order"
            "</a> please.</p><script>document.write('platypus')</script></body></html>")
    forward = open_case(daemon, relay, customer_html_mail("Lost order", html), sender=CUSTOMER)
    text = forward.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert re.search(r"My order 4711 never arrived\.\n\s*\nSee my order <https://tickets.example/order/4711> please\.",
                     text), text
    assert "zebra" not in text and "platypus" not in text and "color" not in text and "<" + "p>" not in text
    [attached] = list(forward.iter_attachments())
    assert attached.get_filename() == "message.html" and attached.get_content_type() == "text/html"
    assert attached.get_content().rstrip() == html


def test_an_alternative_with_attachments_renders_and_its_dkim_signature_verifies(tmp_path: Path) -> None:
    html = ('<!DOCTYPE html>\n<html><body><p>Grüße, <a href="https://x.example/a">link</a></p>'
            + "x" * 3000 + "</body></html>")
    draft = Draft(from_name="TicketNest", from_address=CARE, to=(CUSTOMER,), subject="Re: Grüße", text="Grüße\n",
                  message_id="m1@ticketnest.test", html=html,
                  attachments=(Attachment("a.pdf", "application/pdf", b"%PDF-1.4"),))
    raw = render(draft)
    msg = message_from_bytes(raw, policy=policy.default)
    assert [p.get_content_type() for p in msg.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html", "application/pdf"]
    assert msg.get_body(("plain",)).get_content() == "Grüße\r\n"
    assert msg.get_body(("html",)).get_content().replace("\r\n", "\n") == html
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998 and b"\n" not in raw.replace(b"\r\n", b"")
    private = write_key(tmp_path / "k.pem")
    pem = (tmp_path / "k.pem").read_bytes()
    record = "".join(re.findall(r'"([^"]*)"', txt_record("s1", "ticketnest.test", private))).encode()
    signed = Signer({"ticketnest": SiteKey(b"s1", b"ticketnest.test", pem)}).sign("ticketnest", raw)
    dns = {b"s1._domainkey.ticketnest.test.": record}
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: dns.get(name))


@pytest.mark.parametrize("hostile", [
    '<a href="javascript:alert(1)">x</a>', '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    '<img src="data:image/svg+xml;base64,PHN2Zz4=">', '<img srcset="https://t.example/a.png 2x">',
    '<svg><image href="https://t.example/a.png"/></svg>', '<link rel="stylesheet" href="https://t.example/s.css">',
    '<table background="https://t.example/b.png"><tr><td>x</td></tr></table>',
    '<div style="background:u\\72l(https://t.example/b.png)">x</div>', '<div style="background-image:url(x)">x</div>',
    '<video poster="https://t.example/p.png"></video>', '<base href="https://t.example/">',
    '<meta http-equiv="refresh" content="0;url=https://t.example/">', '<iframe src="https://t.example/"></iframe>',
    '<form action="https://t.example/"><input name="x"></form>', '<object data="https://t.example/o"></object>',
    '<style>@import "https://t.example/s.css";</style>', '<p style="list-style-image:url(https://t.example/)">x</p>',
], ids=lambda h: re.sub(r"\W+", "_", h)[:40])
def test_the_answer_html_keeps_nothing_that_fetches_or_runs(hostile: str) -> None:
    html = own_html(f"<div>Your refund is on its way.</div>{hostile}<div>Agent Smith</div>")
    assert "Your refund is on its way." in html and "Agent Smith" in html
    assert "t.example" not in html and "javascript" not in html and "url(" not in html and "data:text" not in html
    assert not re.search(r"<(script|style|link|base|meta|iframe|form|object|svg|video)\b", html)


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/St_Johns"])
def test_the_date_header_is_now_in_local_time(monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """Formatted once a second (mail._date): still the local time and offset at which the mail was rendered."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    mail._date.cache_clear()
    try:
        draft = Draft(from_name="TicketNest", from_address=CARE, to=(CUSTOMER,), subject="s", text="t\n",
                      message_id="m2@ticketnest.test")
        before = int(time.time())
        date = message_from_bytes(render(draft), policy=policy.default)["Date"]
        after = int(time.time())
        assert format_datetime(localtime()) == date or after != before  # the same text, unless a second passed
        assert before <= parsedate_to_datetime(date).timestamp() <= after
        assert parsedate_to_datetime(date).utcoffset() == localtime().utcoffset()
    finally:
        monkeypatch.undo()
        time.tzset()
        mail._date.cache_clear()
