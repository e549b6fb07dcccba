"""Property-based tests (hypothesis) for parse -> case -> forward: parse never raises on any bytes,
render never emits a header the draft did not intend, whatever the customer wrote, and the contact
form's field rules keep line breaks out of one-line fields."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from email import policy
from email.mime.text import MIMEText

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from careservice.intake.smtp import _Session
from careservice.intake.smtp import _Sessions
from careservice.intake.web import FIELDS
from careservice.intake.web import field_problem
from careservice.mail import _OUTGOING
from careservice.mail import _UTF8_QP
from careservice.mail import Attachment
from careservice.mail import Draft
from careservice.mail import Parsed
from careservice.mail import _address_header
from careservice.mail import _as_bytes
from careservice.mail import _plain_7bit
from careservice.mail import _text_header
from careservice.mail import _text_part
from careservice.mail import parse
from careservice.mail import render
from tests.reliability.helpers import SCALE

pytestmark = pytest.mark.reliability

PROFILE = settings(max_examples=150 * SCALE, deadline=timedelta(seconds=5), database=None,
                   suppress_health_check=[HealthCheck.too_slow])
HEADER_NAMES = ["From", "To", "Cc", "Subject", "Message-ID", "References", "In-Reply-To", "Content-Type",
                "Content-Transfer-Encoding", "Content-Disposition", "Auto-Submitted", "Precedence",
                "List-Id", "Received", "X-Careservice-Loop", "Delivered-To", "MIME-Version", "Date"]
EOLS = [b"\r\n", b"\n", b"\r"]


def check(parsed: Parsed) -> None:
    for value in (parsed.from_name, parsed.from_address, parsed.subject, parsed.message_id, *parsed.references):
        assert "\r" not in value and "\n" not in value and "\x00" not in value
    assert len(parsed.subject) <= 500 and len(parsed.from_address) <= 254
    assert parsed.from_address == "" or ("@" in parsed.from_address and parsed.from_address.isprintable()
                                         and not any(c.isspace() for c in parsed.from_address))
    assert all(isinstance(a.data, bytes) for a in parsed.attachments)


@PROFILE
@given(raw=st.binary(max_size=4000), mail_from=st.text(max_size=80))
def test_parse_never_raises_on_arbitrary_bytes(raw: bytes, mail_from: str) -> None:
    check(parse(raw, mail_from))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """Header-shaped input: known and random names, arbitrary byte values, random line ends,
    folding, and sometimes a MIME body built from the same material."""
    eol = draw(st.sampled_from(EOLS))
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.sampled_from(HEADER_NAMES) | st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                                                         exclude_characters=":"), min_size=1,
                                                            max_size=20).map(str))
        value = draw(st.binary(max_size=300) | st.sampled_from([
            b"multipart/mixed; boundary=b", b"multipart/report; report-type=delivery-status; boundary=b",
            b"=?utf-8?q?a=0D=0AX-Injected:_1?=", b"=?x-unknown?b?////?=", b"(((((((((((a", b"<a@b>",
            b"text/plain; charset=utf-16", b"base64", b"quoted-printable", b"auto-replied"]))
        if draw(st.booleans()):
            value = value.replace(b" ", eol + b" ", 3)
        lines.append(name.encode("ascii") + b": " + value)
    body = draw(st.binary(max_size=1500))
    if draw(st.booleans()):
        part = draw(st.sampled_from([b"Content-Type: text/plain", b"Content-Type: text/html",
                                     b"Content-Type: application/ms-tnef; name=winmail.dat",
                                     b"Content-Transfer-Encoding: base64", b""]))
        body = eol.join([b"--b", part, b"", body, b"--b" + draw(st.sampled_from([b"--", b""]))])
    return eol.join(lines) + eol + eol + body


@PROFILE
@given(raw=messages(), mail_from=st.sampled_from(["", "a@customer.example", "MAILER-DAEMON@x.example"]))
def test_parse_never_raises_on_header_shaped_input(raw: bytes, mail_from: str) -> None:
    check(parse(raw, mail_from))


def rendered_headers(draft: Draft) -> list[str]:
    """The header names of the rendered draft, read structurally (compat32 does not interpret values)."""
    return [key.lower() for key in message_from_bytes(render(draft), policy=policy.compat32).keys()]


def intended(draft: Draft) -> list[str]:
    names = ["from", "to", "subject", "date", "message-id"]
    names += ["reply-to"] * bool(draft.reply_to) + ["in-reply-to"] * bool(draft.in_reply_to)
    names += ["references"] * bool(draft.references or draft.in_reply_to)
    names += ["auto-submitted", "x-auto-response-suppress"] * draft.automatic
    names += ["x-careservice-loop"] * bool(draft.loop_marker)
    names += ["content-type", "mime-version"] + ["content-transfer-encoding"] * (not draft.attachments)
    return sorted(names)


@PROFILE
@given(name=st.text(max_size=300), subject=st.text(max_size=1200), text=st.text(max_size=2000),
       customer=st.text(max_size=80), filename=st.text(max_size=300), ctype=st.text(max_size=60),
       automatic=st.booleans())
def test_render_emits_exactly_the_intended_headers(name: str, subject: str, text: str, customer: str,
                                                   filename: str, ctype: str, automatic: bool) -> None:
    draft = Draft(from_name=name, from_address="care@ticketnest.test", to=(customer or "x@y.example",),
                  subject=subject, text=text, message_id="abc@ticketnest.test", reply_to="care+x@ticketnest.test",
                  in_reply_to="orig@customer.example", automatic=automatic,
                  attachments=(Attachment(filename, ctype, b"\x00data"),) if filename else (),
                  loop_marker="care.test")
    assert sorted(rendered_headers(draft)) == intended(draft)


@PROFILE
@given(raw=messages())
def test_parse_then_forward_adds_no_header(raw: bytes) -> None:
    """The forward path: whatever the customer's headers say, the forward has only our headers."""
    parsed = parse(raw, "a@customer.example")
    draft = Draft(from_name=f"{parsed.from_name or parsed.from_address} via TicketNest",
                  from_address="care@ticketnest.test", to=("agent@staff.example",),
                  subject=f"[Case abc] {parsed.subject}", text=parsed.text, message_id="fw@ticketnest.test",
                  reply_to="care+x@ticketnest.test", attachments=parsed.attachments, loop_marker="care.test")
    assert sorted(rendered_headers(draft)) == intended(draft)


# ----- the contact form's field rules, and a form submission on its way to a case -----

FORM_CONTROL = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}
LINE_CHARS = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))  # what a one-line field can hold


@PROFILE
@given(field=st.sampled_from(sorted(FIELDS)), value=st.text(max_size=400) | st.text(max_size=12_000))
def test_form_field_rules_never_pass_a_line_break_into_a_one_line_field(field: str, value: str) -> None:
    rule = FIELDS[field]
    problem = field_problem(rule, value)
    assert problem in ("", "missing", "too_long", "control", "too_many_lines")
    if problem == "" and value.strip():
        assert len(value) <= rule.limit
        if rule.lines == 1:
            assert not FORM_CONTROL & set(value), value
        else:
            assert len(value.splitlines()) <= rule.lines
            assert not (FORM_CONTROL - {"\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
                                        "\u2028", "\u2029"}) & set(value)


@PROFILE
@given(name=st.text(LINE_CHARS, min_size=1, max_size=200),
       query=st.lists(st.text(LINE_CHARS, max_size=200), min_size=1, max_size=30).map("\n".join))
def test_form_submission_becomes_a_mail_with_only_our_headers(name: str, query: str) -> None:
    """What web.py's message() builds from accepted fields parses back to the same sender, one header each."""
    assume(not field_problem(FIELDS["name"], name) and not field_problem(FIELDS["query"], query))
    draft = Draft(from_name=name.strip(), from_address="zoe@customer.example", to=("care@ticketnest.test",),
                  subject="Contact form", text="\n".join(query.splitlines()).rstrip(),
                  message_id="form@ticketnest.test")
    assert sorted(rendered_headers(draft)) == intended(draft)
    parsed = parse(render(draft), "zoe@customer.example")
    assert parsed.from_address == "zoe@customer.example" and parsed.from_count == 1
    assert parsed.subject == "Contact form" and not parsed.automatic


ADDRESS_CHARS = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-.@<>[]()\":;,\\ \t=ü"


@pytest.fixture(scope="module")
def smtp_session() -> Iterator[_Session]:
    loop = asyncio.new_event_loop()
    yield _Session(_Sessions(1, 1, 1), SMTP(object(), hostname="test.localhost", loop=loop))
    loop.close()


@PROFILE
@given(local=st.text(string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-.", min_size=1, max_size=20),
       domain=st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=20),
       rest=st.sampled_from(["", " ", "  SIZE=100", "\tBODY=8BITMIME", " (comment) SIZE=1", "(c)", "x", ">"]),
       noise=st.text(ADDRESS_CHARS, max_size=30))
def test_fast_address_path_reads_like_aiosmtpd(smtp_session: _Session, local: str, domain: str, rest: str,
                                               noise: str) -> None:
    """Where the `<local@domain>` fast path matches, it must give exactly aiosmtpd's own answer."""
    for arg in (f"<{local}@{domain}>{rest}", noise, f"<{noise}>{rest}"):
        try:
            expected = SMTP._getaddr(smtp_session, arg)
        except Exception:  # aiosmtpd itself fails on some hostile input (the session answers 451)
            continue
        assert smtp_session._getaddr(arg) == expected, arg


@PROFILE
@given(text=st.text(max_size=3000) | st.text(string.printable, max_size=3000))
def test_rendered_body_reads_back_as_written(text: str) -> None:
    """7bit when the text allows it, quoted-printable otherwise: the customer reads what staff wrote."""
    draft = Draft("Staff", "care@ticketnest.example", ("c@customer.example",), "Re: tickets", text, "id@x.example")
    body = message_from_bytes(render(draft), policy=policy.default).get_content()
    assert same_lines(body) == same_lines(text)


def same_lines(text: str) -> str:
    """`text` with every line end as LF (the mail format carries CR, LF and CRLF alike as CRLF)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@PROFILE
@given(text=st.text(max_size=3000) | st.text("ab \n\r\t.From>=", max_size=3000)
       | st.lists(st.text("xy ", min_size=990, max_size=1010), max_size=3).map("\n".join),
       recipient=st.sampled_from(["c@customer.example", "jürgen@exämple.de"]))
def test_the_text_part_and_its_flattening_are_byte_for_byte_what_mimetext_and_the_generator_write(
        text: str, recipient: str) -> None:
    """render builds its single text part without MIMEText and joins it without the generator (measured:
    two thirds of its time); the bytes must not change, raw UTF-8 (SMTPUTF8) address headers included."""
    text = text.replace("\r\n", "\n")
    reference = MIMEText(text, "plain", "us-ascii" if _plain_7bit(text) else _UTF8_QP)
    part = _text_part(text)
    for msg in (reference, part):
        msg["To"] = _address_header("", recipient)
        msg["Subject"] = _text_header("Grüße " * 20)
    assert _as_bytes(part) == reference.as_bytes(policy=_OUTGOING)
