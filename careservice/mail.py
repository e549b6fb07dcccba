"""Parse untrusted mail with limits, and build the mail we send (stdlib `email`, policy.default)."""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from email.charset import QP, Charset
from email.header import Header
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from email.policy import Compat32, EmailPolicy
from email.utils import format_datetime, formataddr, getaddresses, localtime
from typing import Any

MAX_HEADER_BLOCK = 64 * 1024
MAX_HEADER_LINE = 4 * 1024  # longer (unfolded) headers are dropped before parsing: CPython is quadratic on them
MAX_PARTS = 200  # the parser stops at the next part: it spends ~0.2 ms on each, and 10 MB hold 100,000s
MAX_DEPTH = 20
LOOP_HEADER = "X-Careservice-Loop"
AUTO_PRECEDENCE = {"bulk", "junk", "list", "auto_reply"}
AUTOREPLY_HEADERS = ("X-Autoreply", "X-Autorespond")  # older vacation responders set one of these
SYSTEM_LOCALPARTS = {"mailer-daemon", "postmaster", "noreply", "no-reply", "double-bounce"}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u0085\u2028\u2029]")
_MSGID = re.compile(r"<([^<>\s]{1,250})>")
# Line ends as the stdlib parser sees them (CRLF, CR or LF), atomic so CRLF never counts as two.
_HEADER_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE = re.compile(rb"(?>\r\n|\r|\n)(?![ \t])")
_TAG = re.compile(r"<[^<>]{0,2000}>")  # [^<>], not [^>]: linear on "<<<<..."


class _OutgoingPolicy(Compat32):
    """compat32 with CRLF; short ASCII header lines skip the (costly) folding machinery unchanged."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if isinstance(value, str) and value.isascii() and len(name) + 2 + len(value) <= self.max_line_length:
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_OUTGOING = _OutgoingPolicy(linesep="\r\n")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable in any client, and no line over 76 characters


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Parsed:
    """What the workflow needs from an inbound message; every field is already bounded and clean."""

    from_name: str = ""
    from_address: str = ""
    from_count: int = 0
    subject: str = ""
    message_id: str = ""
    references: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()  # To, Cc, Delivered-To, X-Original-To
    automatic: str = ""  # why this is an auto-reply, bounce or list mail ("" = a person wrote it)
    text: str = ""
    attachments: tuple[Attachment, ...] = field(default=())
    defects: tuple[str, ...] = ()


def one_line(value: str, limit: int = 998) -> str:
    """Control characters (CR, LF, NUL, ...) become spaces: nothing can add a header line."""
    return _CONTROL.sub(" ", value).strip()[:limit]


def _trim_headers(raw: bytes) -> tuple[bytes, list[str]]:
    """Drop oversized header lines, then cap the header block, before the stdlib parser sees them."""
    end = _HEADER_END.search(raw)
    head, body = (raw[: end.start()], raw[end.start():]) if end else (raw, b"")
    lines = _LINE.split(head)
    kept = [line for line in lines if len(line) <= MAX_HEADER_LINE]
    defects = ["long_header_dropped"] if len(kept) != len(lines) else []
    size = 0
    for i, line in enumerate(kept):
        size += len(line) + 2
        if size > MAX_HEADER_BLOCK:
            kept = kept[:i]
            defects.append("header_block_truncated")
            break
    return b"\r\n".join(kept) + body, defects


class _BoundedPolicy(EmailPolicy):
    """policy.default, except that a header value longer than MAX_HEADER_LINE, or one the stdlib
    cannot parse, reads as empty.

    This reaches the headers of every MIME part (which _trim_headers cannot), before anything
    parses their values: CPython's parameter parser is quadratic on a long Content-Type, and its
    comment parser recurses once per "(" (RecursionError after a few hundred).
    """

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        return name, value if len(value) <= MAX_HEADER_LINE else ""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        try:
            return super().header_fetch_parse(name, value)
        except Exception:
            return super().header_fetch_parse(name, "")


class _CachedRegistry(HeaderRegistry):
    """The stdlib registry builds a new header class on every lookup (a quarter of parse time): once each."""

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one registry for the process, bounded
    def __getitem__(self, name: str) -> type[BaseHeader]:
        return super().__getitem__(name)


_REGISTRY = _CachedRegistry()
_PARSING = _BoundedPolicy(header_factory=_REGISTRY)


class _ParsedOnce:
    """A header factory for one message: the stdlib parses a header again on every get() (Content-Type
    nine times per message, three quarters of parse time); here each (name, value) is parsed once.
    It lives as long as its message, so no header outlives the case it came with."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: str) -> BaseHeader:
        key = (name, value)
        header = self._seen.get(key)
        if header is None:
            header = self._seen[key] = _REGISTRY(name, value)
        return header


class _TooComplex(Exception):
    """The message has more than MAX_PARTS MIME parts or more than MAX_DEPTH levels."""


def _part_counter() -> Callable[..., EmailMessage]:
    """A message factory for one parse that stops the parser at part MAX_PARTS + 1."""
    made = -1  # FeedParser calls the factory once to probe its signature

    def make(policy: EmailPolicy) -> EmailMessage:
        nonlocal made
        made += 1
        if made > MAX_PARTS:
            raise _TooComplex
        return EmailMessage(policy=policy)

    return make


def _parse_bytes(data: bytes, headers_only: bool) -> EmailMessage:
    policy = _PARSING.clone(header_factory=_ParsedOnce())
    return BytesParser(_part_counter(), policy=policy).parsebytes(data, headersonly=headers_only)


def _header(msg: EmailMessage, name: str) -> str:
    try:
        value = msg.get(name)
    except Exception:  # the stdlib raises many kinds on hostile headers
        return ""
    return one_line(str(value)) if value is not None else ""


def _automatic(msg: EmailMessage, mail_from: str, from_address: str) -> str:
    """Why `msg` must not be answered automatically (RFC 3834, RFC 5321 §4.5.5), or ""."""
    auto = _header(msg, "Auto-Submitted").lower()
    if auto and auto != "no":
        return "auto_submitted"
    if _header(msg, "Precedence").lower() in AUTO_PRECEDENCE:
        return "precedence"
    if any(_header(msg, name) for name in AUTOREPLY_HEADERS):
        return "autoreply_header"
    if any(k.lower().startswith("list-") for k in msg.keys()):
        return "list"
    if _header(msg, LOOP_HEADER):
        return "loop"
    if _header(msg, "X-Auto-Response-Suppress").lower() in {"all", "autoreply", "oof"}:
        return "auto_response_suppress"
    if _header(msg, "Content-Type").lower().startswith("multipart/report"):
        return "report"
    if not mail_from:
        return "null_sender"
    for address in (mail_from, from_address):
        if address.rsplit("@", 1)[0].lower() in SYSTEM_LOCALPARTS:
            return "system_sender"
    received = sum(1 for k in msg.keys() if k.lower() == "received")
    return "too_many_hops" if received > 50 else ""


def _walk(part: EmailMessage, depth: int, out: list[EmailMessage]) -> None:
    if depth > MAX_DEPTH or len(out) >= MAX_PARTS:
        raise _TooComplex
    out.append(part)
    if part.is_multipart():
        for sub in part.iter_parts():
            _walk(sub, depth + 1, out)


def _content(part: EmailMessage) -> str | bytes:
    try:
        return part.get_content()
    except (LookupError, ValueError, AssertionError, KeyError):
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return payload.decode("utf-8", "replace") if part.get_content_maintype() == "text" else payload
        return ""


def _body(msg: EmailMessage) -> tuple[str, list[Attachment]]:
    parts: list[EmailMessage] = []
    _walk(msg, 0, parts)
    text, html, attachments = "", "", []
    for part in parts:
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        ctype = part.get_content_type()
        if disposition != "attachment" and ctype == "text/plain" and not text:
            content = _content(part)
            text = content if isinstance(content, str) else content.decode("utf-8", "replace")
        elif disposition != "attachment" and ctype == "text/html" and not html:
            content = _content(part)
            html = content if isinstance(content, str) else content.decode("utf-8", "replace")
        else:
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                name = one_line(part.get_filename() or "attachment", 200) or "attachment"
                attachments.append(Attachment(name, ctype, data))
    if not text and html:
        text = _TAG.sub(" ", html)
    return text.replace("\x00", ""), attachments


def _defect(where: str, exc: Exception) -> str:
    return "mime_too_deep_or_large" if isinstance(exc, _TooComplex) else f"{where}_{type(exc).__name__}"


def message_ids(value: str) -> tuple[str, ...]:
    return tuple(_MSGID.findall(value))[:50]


def parse(raw: bytes, mail_from: str) -> Parsed:
    """Parse `raw` within fixed limits; never raises: problems become `defects`."""
    trimmed, defects = _trim_headers(raw)
    try:
        msg = _parse_bytes(trimmed, headers_only=False)
        whole = True
    except Exception as exc:  # deep MIME (RecursionError), too many parts, a stdlib bug on hostile input
        msg = _parse_bytes(trimmed, headers_only=True)
        whole = False
        defects.append(_defect("unparsable", exc))
    try:
        froms = msg.get_all("From") or []
        addresses = getaddresses([str(f) for f in froms])
    except Exception:
        addresses, defects = [], [*defects, "bad_from"]
    name, address = addresses[0] if addresses else ("", "")
    if "@" not in address or not address.isprintable() or any(c.isspace() for c in address):
        address = ""  # e.g. U+2028 in a raw UTF-8 name made the stdlib return "victim@x.example x-injected"
    text, attachments = "", [Attachment("original.eml", "message/rfc822", raw)]
    try:
        if whole:
            text, attachments = _body(msg)
    except Exception as exc:  # the stdlib raises many kinds on hostile MIME structure
        defects.append(_defect("body", exc))
    recipients: list[str] = []
    for header in ("To", "Cc", "Delivered-To", "X-Original-To"):
        try:
            recipients += [a for _, a in getaddresses([str(v) for v in msg.get_all(header) or []])]
        except Exception:
            defects.append(f"bad_{header.lower()}")
    return Parsed(
        from_name=one_line(name, 200), from_address=one_line(address, 254).lower(), from_count=len(addresses),
        subject=one_line(_header(msg, "Subject"), 500),
        message_id=(message_ids(_header(msg, "Message-ID")) or ("",))[0],
        references=message_ids(_header(msg, "References") + " " + _header(msg, "In-Reply-To")),
        recipients=tuple(one_line(r, 254).lower() for r in recipients[:100]),
        automatic=_automatic(msg, mail_from, address), text=text, attachments=tuple(attachments),
        defects=tuple(defects),
    )


def new_message_id(domain: str, left: str = "") -> str:
    return f"{left or secrets.token_hex(12)}@{domain}"


@dataclass(frozen=True)
class Draft:
    """An outgoing message before it is rendered to bytes."""

    from_name: str
    from_address: str
    to: tuple[str, ...]
    subject: str
    text: str
    message_id: str
    reply_to: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    automatic: bool = False
    attachments: tuple[Attachment, ...] = ()
    loop_marker: str = ""


def _address_header(name: str, address: str) -> str:
    """`Name <address>`, the name RFC 2047-encoded when it is not ASCII. An address that is not
    ASCII (SMTPUTF8, RFC 6531) is written as raw UTF-8 (RFC 6532): formataddr refuses it."""
    name, address = one_line(name, 200), one_line(address, 254)
    if address.isascii():
        return formataddr((name, address), "utf-8")
    raw = address.encode("utf-8").decode("ascii", "surrogateescape")  # compat32 writes it byte for byte
    return f"{Header(name, 'utf-8').encode()} <{raw}>" if name else raw


def _text_header(value: str) -> Header | str:
    value = one_line(value)
    return value if value.isascii() else Header(value, "utf-8")


def _plain_7bit(text: str) -> bool:
    """True when `text` can go as it is (7bit, RFC 5322 line lengths): no quoted-printable to encode."""
    return text.isascii() and "\r" not in text and all(len(line) <= 998 for line in text.split("\n"))


def render(draft: Draft) -> bytes:
    """Build the RFC 5322 bytes (CRLF) of `draft`; header values are single-line by construction.

    Uses the compat32 MIME classes: about 4x cheaper than EmailMessage with policy.default, and every
    value is passed through one_line() first, so no input can start a header line.
    """
    text = draft.text.replace("\r\n", "\n")  # the generator writes every line end as CRLF
    body = MIMEText(text, "plain", "us-ascii" if _plain_7bit(text) else _UTF8_QP)
    msg: Message = body
    if draft.attachments:
        msg = MIMEMultipart()
        msg.attach(body)
        for a in draft.attachments:
            maintype, _, subtype = a.content_type.partition("/")
            part = MIMEApplication(a.data, subtype if maintype == "application" and subtype else "octet-stream")
            if maintype not in ("", "text", "application"):
                part.replace_header("Content-Type", f"{one_line(a.content_type, 100)}")
            part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", one_line(a.filename, 200)))
            msg.attach(part)
    msg["From"] = _address_header(draft.from_name, draft.from_address)
    msg["To"] = ", ".join(_address_header("", a) for a in draft.to)
    if draft.reply_to:
        msg["Reply-To"] = _address_header("", draft.reply_to)
    msg["Subject"] = _text_header(draft.subject)
    msg["Date"] = format_datetime(localtime())
    msg["Message-ID"] = f"<{draft.message_id}>"
    if draft.in_reply_to:
        msg["In-Reply-To"] = f"<{draft.in_reply_to}>"
    refs = [r for r in (*draft.references, draft.in_reply_to) if r]
    if refs:
        msg["References"] = " ".join(f"<{r}>" for r in dict.fromkeys(refs))
    if draft.automatic:
        msg["Auto-Submitted"] = "auto-replied"
        msg["X-Auto-Response-Suppress"] = "All"
    if draft.loop_marker:
        msg[LOOP_HEADER] = one_line(draft.loop_marker)
    return msg.as_bytes(policy=_OUTGOING)
