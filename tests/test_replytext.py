"""careservice.replytext alone: the staff member's words out of replies that the client tests do not build."""

from __future__ import annotations

import pytest

from careservice.mail import Attachment, Parsed
from careservice.replytext import Forwarded, StaffReply, html_text, read_reply, relay_problem

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
    assert read_reply("", html, FORWARDED).text == "Done, see https://x.example/a or write to us <care@ticketnest.test>."


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
