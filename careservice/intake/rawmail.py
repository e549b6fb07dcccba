"""What the intake reads from a raw message before the mail parser sees it: the envelope sender of mail
taken over IMAP, and the digest that recognises a message taken before.

The envelope sender of a message read over IMAP is its Return-Path header (written by the delivering
server; `<>` marks a bounce), or else its From address, so mail appended without a Return-Path is
still a customer's mail and not mistaken for a bounce. Both, like the Message-ID, are read within
careservice.mail's header limits, which the intake would otherwise pass unbounded.
"""

from __future__ import annotations

import hashlib
import re
from email.utils import getaddresses, parseaddr

from careservice.crypto import Keyring
from careservice.mimeparse import MAX_HEADER_BLOCK, MAX_HEADER_LINE

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _field(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"^" + name + rb"[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


_RETURN_PATH, _FROM, _MESSAGE_ID = _field(b"Return-Path"), _field(b"From"), _field(b"Message-ID")


def _header(head: bytes, pattern: re.Pattern[bytes]) -> str | None:
    """The first `pattern` header, folding undone, looked for as careservice.mail's parser sees the
    message: in the first MAX_HEADER_BLOCK bytes only, skipping a header longer than MAX_HEADER_LINE
    (and one cut off by the block's end). The stdlib address parser takes about a second per megabyte,
    and this runs in the intake process, before any limit of the parser's applies."""
    cut = MAX_HEADER_BLOCK < len(head)
    for match in pattern.finditer(head, 0, MAX_HEADER_BLOCK):
        if cut and match.end() == MAX_HEADER_BLOCK:
            break
        if len(match.group(0)) <= MAX_HEADER_LINE:
            return " ".join(match.group(1).decode("utf-8", "replace").split())
    return None


def _head(raw: bytes) -> tuple[bytes, bytes]:
    """The header block and the content after it ("" when there is no blank line)."""
    end = _HEADER_END.search(raw)
    return (raw[: end.start()], raw[end.end():]) if end else (raw, b"")


def envelope_sender(raw: bytes) -> str:
    """Return-Path's address ("" for `<>`), else the first From address, else ""."""
    head, _ = _head(raw)
    return_path = _header(head, _RETURN_PATH)
    try:
        if return_path is not None:
            return parseaddr(return_path)[1]
        sender = _header(head, _FROM)
        addresses = [a for _, a in getaddresses([sender])] if sender else []
    except Exception:  # e.g. RecursionError on nested comments: such a message must not block the mailbox
        return ""
    return addresses[0] if addresses and "@" in addresses[0] else ""


def dedupe_key(keyring: Keyring, site: str, raw: bytes) -> bytes:
    """The keyed digest that recognises a message taken before.

    Site + Message-ID + SHA-256 of the body, so a re-delivery with new trace headers is the
    same message; without a Message-ID the whole raw message is hashed instead.
    """
    head, content = _head(raw)
    message_id = _header(head, _MESSAGE_ID) or ""
    return keyring.digest(f"imap|{site}|{message_id}|{hashlib.sha256(content if message_id else raw).hexdigest()}")
