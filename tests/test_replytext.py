"""careservice.replytext alone: the staff member's words out of replies that the client tests do not build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from careservice.mail import Attachment
from careservice.mail import Parsed
from careservice.mail import parse
from careservice.replytext import Forwarded
from careservice.replytext import StaffReply
from careservice.replytext import html_text
from careservice.replytext import read_reply
from careservice.replytext import relay_problem

OWN = """New message for TicketNest customer care, case 0123456789ab.

Name:      Wilhelmina Markername
E-Mail:    wilhelmina@customer.example
Wishes to be contacted by: email

---------------------------------------------------------------------

---------------------------------------------------------------------

Press Reply to answer: your text above the quote goes to the customer from
care@ticketnest.test; your own address is never shown to them.
"""
FORWARDED = Forwarded.of([OWN], "Order 4711 never arrived, please help.")


@pytest.mark.parametrize(("text", "expected"), [
    # a copy of the forward pasted without quote marks: its own blocks go, whitespace as HTML changed it
    ("Done.\n\nName: Wilhelmina Markername\nPress Reply to answer: your text above the quote goes to the "
     "customer from", StaffReply("Done.")),
    ("Erledigt.\n\nVon: Wilhelmina via TicketNest\nGesendet: Montag, 3. März 2025\nAn: Agent\nBetreff: x\n\n"
     "New message", StaffReply("Erledigt.")),
    ("Done.\n\n-----Original Message-----\nFrom: x\nSent: y\n\nthe forward", StaffReply("Done.")),
    ("On 03.03.25 10:12, W wrote:\n> Which order?\nOrder 4711.\n> When?\nToday.", StaffReply("Order 4711.\nToday.")),
    ("- refund made\n- tickets sent again", StaffReply("- refund made\n- tickets sent again")),
    ("\n\nSent from my iPhone\n", StaffReply("")),
    ("-- \nAgent Smith\nTicketNest", StaffReply("")),
    ("Order 4711 never arrived, please help.", StaffReply("")),  # only the customer's own words
    ("#\nhello", StaffReply("", command="", words="hello")),
    ("\uff03Closed", StaffReply("", command="closed")),  # a full-width "#"
    ("\u200b#closed", StaffReply("", command="closed")),
    ("#4711 is your order number", StaffReply("", command="4711", words="is your order number")),
    ("#note  called her\n\n\n> quoted\nsends a new card",
     StaffReply("", command="note", words="called her\n\nsends a new card")),
])
def test_read_reply(text: str, expected: StaffReply) -> None:
    assert read_reply(text, "", FORWARDED) == expected


def test_an_outlook_header_after_a_plain_hr_ends_the_answer_and_links_keep_their_targets() -> None:
    html = ('<div>Done, see <a href="https://x.example/a">https://x.example/a</a> or '
            '<a href="mailto:care@ticketnest.test">write to us</a>.</div>'
            "<hr><div><b>From:</b> Wilhelmina<br><b>Sent:</b> Monday</div><div>New message for</div>")
    expected = "Done, see https://x.example/a or write to us <care@ticketnest.test>."
    assert read_reply("", html, FORWARDED).text == expected


def test_html_that_is_empty_or_declares_its_encoding() -> None:
    assert html_text("<!-- nothing -->") == ""
    assert html_text('<?xml version="1.0" encoding="iso-8859-1"?><html><body><p>Hi</p></body></html>').strip() == "Hi"


TOKEN = "0123456789ab.01234567"
ADDRESS = f"care+{TOKEN}.abcdefghijklmnop@ticketnest.test"


@pytest.mark.parametrize(("parsed", "problem"), [
    (Parsed(attachments=(Attachment("a.pdf", "application/pdf", bytes(range(256)) * 64),)), ""),
    (Parsed(defects=("long_header_dropped",)), "reply_unreadable"),
    (Parsed(part_types=("multipart/mixed", "text/plain", "message/rfc822", "text/plain")), "reply_attached_mail"),
    (Parsed(attachments=(Attachment("h.txt", "text/rfc822-headers", b"From: x"),)), "reply_attached_mail"),
    (Parsed(attachments=(Attachment("a.txt", "text/plain", ADDRESS.upper().encode()),)), "reply_address_attached"),
    (Parsed(attachments=(Attachment("a.msg", "application/vnd.ms-outlook", b"\x00" + ADDRESS.encode("utf-16-le")),)),
     "reply_address_attached"),
    (Parsed(attachments=(Attachment("a.txt", "text/plain", f"case {TOKEN}".encode()),)), "reply_address_attached"),
], ids=["clean", "defect", "attached_mail", "headers", "address", "address_utf16_odd", "case_token"])
def test_relay_problem(parsed: Parsed, problem: str) -> None:
    assert relay_problem(parsed, TOKEN) == problem


REPLIES = Path(__file__).parent / "fixtures" / "replies"
FORWARD = (REPLIES / "forward.txt").read_text()
CUSTOMER_LINES = [line for line in FORWARD.splitlines() if "QUAGGA" in line or line.startswith("I paid")]
FIXTURE_FORWARD = Forwarded.of([FORWARD.replace("\n".join(CUSTOMER_LINES) + "\n", "")], "\n".join(CUSTOMER_LINES))
# What of the forward, the quote and the clients' headers must never reach the customer
NEVER = ["QUAGGA", "Markername", "0123456789ab", "Press Reply", "wilhelmina@customer.example", "staff.example",
         "wrote:", "From:", "Sent:", "Original Message"]
HTML_ANSWERS = {"outlook_web_html", "outlook_windows_html", "gmail_wrapped_attribution", "apple_mail",
                "gmail_inline_html"}


@pytest.mark.parametrize("name", sorted(p.stem for p in REPLIES.glob("*.eml")))
def test_a_client_reply_gives_exactly_the_staff_text(name: str) -> None:
    """tests/fixtures/replies/NAME.eml as a client sent it, NAME.txt what the customer must read."""
    parsed = parse((REPLIES / f"{name}.eml").read_bytes(), "agent@staff.example")
    reply = read_reply(parsed.text, parsed.html, FIXTURE_FORWARD)
    assert reply.text == (REPLIES / f"{name}.txt").read_text().rstrip("\n")
    assert reply.command is None and not [n for n in NEVER if n in reply.text or n in reply.html]
    assert bool(reply.html) == (name in HTML_ANSWERS)
    if reply.html:
        assert not re.search(r"<(script|style)|url\(|src=\"?https?:|http[^\"]*\.(png|gif)", reply.html, re.IGNORECASE)
