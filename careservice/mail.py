"""Parse untrusted mail with limits, and build the mail we send (stdlib `email`, compat32 classes)."""

from __future__ import annotations

import base64
import functools
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.charset import BASE64, QP, Charset
from email.header import Header, decode_header, make_header
from email.message import Message
from email.policy import Compat32
from email.utils import format_datetime, formataddr, getaddresses
from typing import Any

from careservice.htmlpart import to_text
from careservice.language import content_languages
from careservice.mimeparse import TooComplex, content, parse_headers, parse_message, trim_headers, walk

LOOP_HEADER = "X-Careservice-Loop"
AUTO_PRECEDENCE = {"bulk", "junk", "list", "auto_reply"}
AUTOREPLY_HEADERS = ("X-Autoreply", "X-Autorespond")  # older vacation responders set one of these
MAX_HTML_TEXT = 500_000  # characters of an HTML-only mail made text (~0.2 s): parse() runs at every stage
SYSTEM_LOCALPARTS = {"mailer-daemon", "postmaster", "noreply", "no-reply", "double-bounce"}
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # Unicode categories Cc, Zl and Zp
_MSGID = re.compile(r"<([^<>\s]{1,250})>")
_FOLD = re.compile(r"\r?\n[ \t]*")
_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
# `Name Of Words <local@domain>` or a bare `local@domain`, in the forms whose reading by getaddresses is
# plain (tests/test_parse.py compares them), so most From headers skip its tokenizer
_DOT_ATOM_ADDRESS = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_FROM = re.compile(rf"(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*) *)?<(?P<angled>{_DOT_ATOM_ADDRESS})>"
                         rf"|(?P<bare>{_DOT_ATOM_ADDRESS})")


class _OutgoingPolicy(Compat32):
    """compat32 with CRLF; short ASCII header lines skip the (costly) folding machinery unchanged."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if isinstance(value, str) and value.isascii() and len(name) + 2 + len(value) <= self.max_line_length:
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_OUTGOING = _OutgoingPolicy(linesep="\r\n")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable in any client, and no line over 76 characters
_UTF8_HEADER = Charset("utf-8")
# B always, as Gmail writes it: utf-8's default, the shorter of B and Q, costs a pass over every byte
# (quoprimime.header_length) that was most of render's time for a subject with one non-ASCII character
_UTF8_HEADER.header_encoding = BASE64


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes
    charset: str = ""  # given for a text/* attachment that we made: it then keeps its type


@dataclass(frozen=True)
class Parsed:
    """What the workflow needs from an inbound message; every field is already bounded and clean."""

    from_name: str = ""
    from_address: str = ""
    from_count: int = 0
    subject: str = ""
    message_id: str = ""
    references: tuple[str, ...] = ()
    automatic: str = ""  # why this is an auto-reply, bounce or list mail ("" = a person wrote it)
    text: str = ""
    html: str = ""  # the first text/html part, as sent
    attachments: tuple[Attachment, ...] = field(default=())
    part_types: tuple[str, ...] = ()  # type/subtype of every MIME part, containers and attached messages too
    defects: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()  # Content-Language's primary tags, in its order

    @property
    def attachments_and_html(self) -> tuple[Attachment, ...]:
        """The attachments and, when the mail has an HTML body, that HTML as `message.html`: staff
        read the mail as text, and may want the original layout."""
        if not self.html:
            return self.attachments
        return (*self.attachments, Attachment("message.html", "text/html", self.html.encode("utf-8"), "utf-8"))


def one_line(value: str, limit: int = 998) -> str:
    """Control characters (CR, LF, NUL, tab, ...) become spaces: nothing can add a header line."""
    return CONTROL.sub(" ", value).strip()[:limit]


class _Headers:
    """One message's header values as sent: 8-bit bytes read as UTF-8 (RFC 6532), folding undone."""

    def __init__(self, msg: Message) -> None:
        self.values: dict[str, list[str]] = {}
        for name, value in msg.raw_items():
            text = value.encode("ascii", "surrogateescape").decode("utf-8", "replace") if isinstance(value, str) else ""
            self.values.setdefault(name.lower(), []).append(_FOLD.sub(" ", text).strip())

    def all(self, name: str) -> list[str]:
        return self.values.get(name.lower(), [])

    def first(self, name: str) -> str:
        """The first value as one clean line, RFC 2047 words decoded ("" if absent)."""
        values = self.all(name)
        return one_line(_decoded(values[0])) if values else ""

    def names(self) -> list[str]:
        return list(self.values)


def _decoded(value: str) -> str:
    """`value` with its RFC 2047 encoded words decoded; as it is where they cannot be."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # unknown charset, broken encoding: the stdlib raises several kinds
        return value


def _automatic(headers: _Headers, mail_from: str, from_address: str) -> str:
    """Why the message must not be answered automatically (RFC 3834, RFC 5321 §4.5.5), or ""."""
    auto = headers.first("Auto-Submitted").lower()
    if auto and auto != "no":
        return "auto_submitted"
    if headers.first("Precedence").lower() in AUTO_PRECEDENCE:
        return "precedence"
    if any(headers.first(name) for name in AUTOREPLY_HEADERS):
        return "autoreply_header"
    if any(name.startswith("list-") for name in headers.names()):
        return "list"
    if headers.first(LOOP_HEADER):
        return "loop"
    if headers.first("X-Auto-Response-Suppress").lower() in {"all", "autoreply", "oof"}:
        return "auto_response_suppress"
    if headers.first("Content-Type").lower().startswith("multipart/report"):
        return "report"
    if not mail_from:
        return "null_sender"
    for address in (mail_from, from_address):
        if address.rsplit("@", 1)[0].lower() in SYSTEM_LOCALPARTS:
            return "system_sender"
    return "too_many_hops" if len(headers.all("Received")) > 50 else ""


def _content_type(part: Message) -> str:
    """The part's type/subtype; compat32 keeps a trailing comment ("text/plain (x)"), so only the
    leading token counts, and anything unreadable is text/plain as RFC 2045 says."""
    kind = _CONTENT_TYPE.match(part.get_content_type())
    return kind.group(0) if kind else "text/plain"


def _text(part: Message) -> str:
    """A text part's content: transfer encoding undone, decoded by its charset (UTF-8 when unknown)."""
    data = content(part)
    if data is None:
        return ""
    charset = part.get_content_charset("us-ascii")
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _body(msg: Message) -> tuple[str, str, list[Attachment], list[str]]:
    parts = walk(msg)
    text, html, attachments = "", "", []
    for part in parts:
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        ctype = _content_type(part)
        if disposition != "attachment" and ctype == "text/plain" and not text:
            text = _text(part)
        elif disposition != "attachment" and ctype == "text/html" and not html:
            html = _text(part)
        else:
            data = content(part)
            if data is not None:
                name = one_line(_decoded(part.get_filename() or "attachment"), 200) or "attachment"
                attachments.append(Attachment(name, ctype, data))
    if not text and html:
        text = to_text(html[:MAX_HTML_TEXT])
        if len(html) > MAX_HTML_TEXT:
            text += "\n[... the rest is in the attached message.html]\n"
    return text.replace("\x00", ""), html.replace("\x00", ""), attachments, [_content_type(p) for p in parts]


def _defect(where: str, exc: Exception) -> str:
    return "mime_too_deep_or_large" if isinstance(exc, TooComplex) else f"{where}_{type(exc).__name__}"


def message_ids(value: str) -> tuple[str, ...]:
    return tuple(_MSGID.findall(value))[:50]


def _addresses(values: list[str]) -> list[tuple[str, str]]:
    plain = _PLAIN_FROM.fullmatch(values[0]) if len(values) == 1 else None
    pairs = [(plain["name"] or "", plain["angled"] or plain["bare"])] if plain else getaddresses(values)
    return [(one_line(_decoded(name), 200), address) for name, address in pairs]


def parse(raw: bytes, mail_from: str) -> Parsed:
    """Parse `raw` within fixed limits; never raises: problems become `defects`."""
    head, body, defects = trim_headers(raw)
    try:
        msg = parse_message(head, body)
        whole = True
    except Exception as exc:  # deep MIME (RecursionError), too many parts, a stdlib bug on hostile input
        msg = parse_headers(head)
        whole = False
        defects.append(_defect("unparsable", exc))
    headers = _Headers(msg)
    try:
        addresses = _addresses(headers.all("From"))
    except Exception:
        addresses, defects = [], [*defects, "bad_from"]
    name, address = addresses[0] if addresses else ("", "")
    if "@" not in address or not address.isprintable() or any(c.isspace() for c in address) or "=?" in address:
        address = ""  # e.g. U+2028 in a raw UTF-8 name made the stdlib return "victim@x.example x-injected"
    text, html, attachments, types = "", "", [Attachment("original.eml", "message/rfc822", raw)], []
    try:
        if whole:
            text, html, attachments, types = _body(msg)
    except Exception as exc:  # the stdlib raises many kinds on hostile MIME structure
        defects.append(_defect("body", exc))
    return Parsed(
        from_name=name, from_address=one_line(address, 254).lower(), from_count=len(addresses),
        subject=one_line(headers.first("Subject"), 500),
        message_id=(message_ids(headers.first("Message-ID")) or ("",))[0],
        references=message_ids(headers.first("References") + " " + headers.first("In-Reply-To")),
        automatic=_automatic(headers, mail_from, address), text=text, html=html, attachments=tuple(attachments),
        part_types=tuple(types), defects=tuple(defects), languages=content_languages(headers.first("Content-Language")),
    )


def new_message_id(domain: str) -> str:
    return f"{secrets.token_hex(12)}@{domain}"


@dataclass(frozen=True)
class Draft:
    """An outgoing message before it is rendered to bytes."""

    from_name: str
    from_address: str
    to: tuple[str, ...]
    subject: str
    text: str
    message_id: str
    html: str = ""  # an HTML document: sent as the alternative to `text`
    reply_to: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    automatic: bool = False
    attachments: tuple[Attachment, ...] = ()
    loop_marker: str = ""
    language: str = ""  # its Content-Language ("" = none said)


def _address_header(name: str, address: str) -> str:
    """`Name <address>`, the name RFC 2047-encoded when it is not ASCII. An address that is not
    ASCII (SMTPUTF8, RFC 6531) is written as raw UTF-8 (RFC 6532): formataddr refuses it."""
    name, address = one_line(name, 200), one_line(address, 254)
    if address.isascii():
        return formataddr((name, address), _UTF8_HEADER)
    raw = address.encode("utf-8").decode("ascii", "surrogateescape")  # compat32 writes it byte for byte
    return f"{Header(name, _UTF8_HEADER).encode()} <{raw}>" if name else raw


def _text_header(value: str) -> Header | str:
    value = one_line(value)
    return value if value.isascii() else Header(value, _UTF8_HEADER)


def _plain_7bit(text: str) -> bool:
    """True when `text` can go as it is (7bit, RFC 5322 line lengths): no quoted-printable to encode."""
    return text.isascii() and "\r" not in text and max(map(len, text.split("\n"))) <= 998


def _text_part(text: str, subtype: str = "plain") -> Message:
    """The text/plain (or text/html) part exactly as MIMEText builds it (7bit ASCII, else
    quoted-printable UTF-8), without MIMEText's parsing of the parameters it has just written: that
    was half of render."""
    plain = _plain_7bit(text)
    part = Message()
    part["Content-Type"] = f'text/{subtype}; charset="{"us-ascii" if plain else "utf-8"}"'
    part["MIME-Version"] = "1.0"
    part["Content-Transfer-Encoding"] = "7bit" if plain else "quoted-printable"
    part.set_payload(text if plain else _UTF8_QP.body_encode(text))
    return part


def _as_bytes(msg: Message) -> bytes:
    """`msg.as_bytes()` with the outgoing policy for a single part (ASCII by now: 7bit, quoted-printable
    or base64), joined directly, since the generator writes its body one line at a time."""
    head = b"".join(_OUTGOING.fold_binary(name, value) for name, value in msg.raw_items())
    body = msg.get_payload().replace("\n", "\r\n").encode("ascii")
    return head + b"\r\n" + body


def _alternative(parts: tuple[Message, ...]) -> Message:
    """A multipart/alternative part over `parts` (least preferred first), its body already written."""
    boundary = f"=_{secrets.token_hex(16)}"
    msg = Message()
    msg["Content-Type"] = f'multipart/alternative; boundary="{boundary}"'
    msg["MIME-Version"] = "1.0"
    msg.set_payload("".join(f"--{boundary}\n{_as_bytes(p).decode('ascii')}\n" for p in parts).replace("\r\n", "\n")
                    + f"--{boundary}--\n")
    return msg


def _attachment_head(a: Attachment) -> Message:
    """An attachment part's headers as MIMEApplication writes them; its base64 body is added as bytes."""
    maintype, _, subtype = a.content_type.partition("/")
    part = Message()
    part["Content-Type"] = (
        one_line(f'{a.content_type}; charset="{a.charset}"', 200) if maintype == "text" and a.charset else
        one_line(a.content_type, 100) if maintype not in ("", "text", "application") else
        f"application/{subtype if maintype == 'application' and subtype else 'octet-stream'}")
    part["MIME-Version"] = "1.0"
    part["Content-Transfer-Encoding"] = "base64"
    part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", one_line(a.filename, 200)))
    part.set_payload("")
    return part


def _multipart(msg: Message, body: Message, attachments: tuple[Attachment, ...]) -> bytes:
    """`msg`'s headers over the text part and the attachments, as the generator writes multipart/mixed
    but joined once: the generator holds several copies of each attachment, and a forward carries the
    customer's whole mail."""
    boundary = msg.get_boundary()
    pieces = [_as_bytes(msg), f"--{boundary}\r\n".encode(), _as_bytes(body)]
    for a in attachments:
        pieces += [f"\r\n--{boundary}\r\n".encode(), _as_bytes(_attachment_head(a)),
                   base64.encodebytes(a.data).replace(b"\n", b"\r\n")]
    pieces.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(pieces)


@functools.lru_cache(maxsize=1)
def _date(second: int) -> str:
    """The Date header of the mail rendered in this second, in local time (once a second: it was 1.5 %
    of the worker's CPU per case, most of it email.utils.localtime() building a time zone)."""
    return format_datetime(datetime.fromtimestamp(second).astimezone())


def render(draft: Draft) -> bytes:
    """Build the RFC 5322 bytes (CRLF) of `draft`; header values are single-line by construction.

    Uses the compat32 MIME classes: about 4x cheaper than EmailMessage with policy.default, and every
    value is passed through one_line() first, so no input can start a header line.
    """
    text = draft.text.replace("\r\n", "\n")  # every line end is written as CRLF
    body = _text_part(text)
    if draft.html:
        body = _alternative((body, _text_part(draft.html.replace("\r\n", "\n"), "html")))
    msg: Message = body
    if draft.attachments:  # "=_" occurs in neither base64 nor quoted-printable, and a 7bit text cannot guess it
        msg = Message()
        msg["Content-Type"] = f'multipart/mixed; boundary="=_{secrets.token_hex(16)}"'
        msg["MIME-Version"] = "1.0"
        msg.set_payload("")
    msg["From"] = _address_header(draft.from_name, draft.from_address)
    msg["To"] = ", ".join(_address_header("", a) for a in draft.to)
    if draft.reply_to:
        msg["Reply-To"] = _address_header("", draft.reply_to)
    msg["Subject"] = _text_header(draft.subject)
    msg["Date"] = _date(int(time.time()))
    msg["Message-ID"] = f"<{draft.message_id}>"
    if draft.in_reply_to:
        msg["In-Reply-To"] = f"<{draft.in_reply_to}>"
    refs = [r for r in (*draft.references, draft.in_reply_to) if r]
    if refs:
        msg["References"] = " ".join(f"<{r}>" for r in dict.fromkeys(refs))
    if draft.language:
        msg["Content-Language"] = one_line(draft.language, 35)
    if draft.automatic:
        msg["Auto-Submitted"] = "auto-replied"
        msg["X-Auto-Response-Suppress"] = "All"
    if draft.loop_marker:
        msg[LOOP_HEADER] = one_line(draft.loop_marker)
    return _multipart(msg, body, draft.attachments) if draft.attachments else _as_bytes(msg)
