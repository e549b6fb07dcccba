"""Untrusted bytes through the stdlib MIME parser within fixed limits, in as few copies as it allows.

Oversized header lines and header blocks are cut before the parser sees them (CPython is quadratic
on them), a header value over the limit reads as empty in every part, and the parser stops at a
part count or depth. The message is fed to the parser in pieces and base64 is decoded in one step:
the stdlib's own paths copy a large message several times over, and the worker holds a batch of them.
"""

from __future__ import annotations

import binascii
import contextlib
import re
from email.feedparser import FeedParser
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32

MAX_HEADER_BLOCK = 64 * 1024
MAX_HEADER_LINE = 4 * 1024  # longer (unfolded) headers are dropped before parsing: CPython is quadratic on them
MAX_PARTS = 200  # the parser stops at the next part: it spends ~0.2 ms on each, and 10 MB hold 100,000s
MAX_DEPTH = 20
FEED_CHUNK = 64 * 1024
# Line ends as the stdlib parser sees them (CRLF, CR or LF), atomic so CRLF never counts as two. Every reader
# of a raw header block ends it here, so no two of them disagree on where the body starts. Group 1: the
# header block's last line end.
HEADER_END = re.compile(rb"((?>\r\n|\r|\n))(?>\r\n|\r|\n)")
_LINE = re.compile(rb"(?>\r\n|\r|\n)(?![ \t])")
_NESTED = ("multipart", "message")  # the parser reads these bodies part by part


class TooComplex(Exception):
    """The message has more than MAX_PARTS MIME parts or more than MAX_DEPTH levels."""


def trim_headers(raw: bytes) -> tuple[bytes, memoryview, list[str]]:
    """Drop oversized header lines, then cap the header block, before the stdlib parser sees them.
    Returns the header block, a view of the rest (from the blank line on) and the defects found."""
    end = HEADER_END.search(raw)
    head, body = (raw[: end.start()], memoryview(raw)[end.start():]) if end else (raw, memoryview(b""))
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
    return b"\r\n".join(kept), body, defects


class _BoundedCompat32(Compat32):
    """compat32 (headers stay strings until we read them: policy.default parsed each one again on
    every access, 80% of parse time), except that a header value longer than MAX_HEADER_LINE reads
    as empty. This reaches the headers of every MIME part, which trim_headers cannot."""

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        return name, value if len(value) <= MAX_HEADER_LINE else ""


_PARSING = _BoundedCompat32()


class _Parts:
    """The message factory for one parse: stops the parser at part MAX_PARTS + 1, and keeps the root
    (the first part), so that its headers can be read while the body is still to come."""

    def __init__(self) -> None:
        self.made = -1  # FeedParser calls the factory once to probe its signature: part 0
        self.root: Message | None = None

    def __call__(self, policy: Compat32) -> Message:
        self.made += 1
        if self.made > MAX_PARTS:
            raise TooComplex
        msg = Message(policy=policy)
        if self.made == 1:
            self.root = msg
        return msg


def parse_message(head: bytes, body: memoryview) -> Message:
    """BytesParser.parsebytes(head + body), fed in pieces: parsebytes decodes the whole message into
    one string and reads it back through a StringIO that holds four bytes a character.

    The body of a message that is neither multipart nor message/* is not fed: for those the parser
    only joins the lines after the header block into the payload, line by line (most of its time for
    a plain mail), so the payload is made here from the same text in one step."""
    parts = _Parts()
    parser = FeedParser(parts, policy=_PARSING)
    separator = HEADER_END.match(body)
    if not separator:
        return _fed(parser, memoryview(head), body)
    _feed(parser, memoryview(head), body[:separator.end()])
    rest = body[separator.end():]
    # the root has its headers once the parser has read the blank line (a CR at the end of the feed it
    # holds back, as the start of a possible CRLF: then this reads the default type)
    if parts.root is not None and parts.root.get_content_maintype() in _NESTED:
        return _fed(parser, rest)
    msg = parser.close()
    if msg.get_content_maintype() in _NESTED:  # the held-back CR case: parsed again, whole
        return _fed(FeedParser(_Parts(), policy=_PARSING), memoryview(head), body)
    # what the parser had put in the payload: "" after a blank line, else the lines from the first one
    # it did not take for a header
    msg.set_payload(msg.get_payload() + str(rest, "ascii", "surrogateescape"))
    return msg


def _feed(parser: FeedParser, *pieces: memoryview) -> None:
    for piece in pieces:
        for start in range(0, len(piece), FEED_CHUNK):
            parser.feed(str(piece[start:start + FEED_CHUNK], "ascii", "surrogateescape"))


def _fed(parser: FeedParser, *pieces: memoryview) -> Message:
    _feed(parser, *pieces)
    return parser.close()


def parse_headers(head: bytes) -> Message:
    """The header block alone, for a message whose body the parser could not take."""
    return BytesParser(_Parts(), policy=_PARSING).parsebytes(head, headersonly=True)


def walk(msg: Message) -> list[Message]:
    """Every part of `msg`, depth first; raises TooComplex past MAX_DEPTH levels or MAX_PARTS parts."""
    out: list[Message] = []
    stack = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        if depth > MAX_DEPTH or len(out) >= MAX_PARTS:
            raise TooComplex
        out.append(part)
        if part.is_multipart():
            stack += [(sub, depth + 1) for sub in reversed(part.get_payload())]
    return out


def content(part: Message) -> bytes | None:
    """`part.get_payload(decode=True)`, except that base64 goes to binascii in one step: the stdlib
    first splits it into lines and joins them again, two more copies of a large attachment."""
    payload = part.get_payload()
    if isinstance(payload, str) and str(part.get("content-transfer-encoding", "")).lower() == "base64":
        with contextlib.suppress(binascii.Error):  # bad padding: the stdlib's repairs below
            return binascii.a2b_base64(payload.encode("ascii", "surrogateescape"))
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else None
