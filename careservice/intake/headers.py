"""Reading an inbound message's raw header block before any parser sees it: cheap and bounded.

Both mail adapters use it in the intake process, where the full parser (careservice.mail) does not
run: the envelope sender and recipient of a mail taken from IMAP, and the key that recognises a message
taken before.
"""

from __future__ import annotations

import hashlib
import re
from email.utils import getaddresses, parseaddr

from careservice.mimeparse import HEADER_END, MAX_HEADER_BLOCK, MAX_HEADER_LINE
from careservice.model import Envelope


def _field(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"^" + name + rb"[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


_RETURN_PATH, _FROM, _MESSAGE_ID = _field(b"Return-Path"), _field(b"From"), _field(b"Message-ID")


def _header(head: bytes, pattern: re.Pattern[bytes], topmost: bool = False) -> str | None:
    """The first `pattern` header, folding undone, looked for as careservice.mail's parser sees the
    message: in the first MAX_HEADER_BLOCK bytes only, skipping a header longer than MAX_HEADER_LINE
    (and one cut off by the block's end). The stdlib address parser takes about a second per megabyte,
    and this runs in the intake process, before any limit of the parser's applies. With `topmost`
    nothing is skipped: when the first one is unusable the answer is None, never a lower copy."""
    cut = MAX_HEADER_BLOCK < len(head)
    for match in pattern.finditer(head, 0, MAX_HEADER_BLOCK):
        if cut and match.end() == MAX_HEADER_BLOCK:
            break
        if len(match.group(0)) <= MAX_HEADER_LINE:
            return " ".join(match.group(1).decode("utf-8", "replace").split())
        if topmost:
            break
    return None


def _head(raw: bytes) -> tuple[bytes, bytes]:
    """The header block and the content after it ("" when there is no blank line)."""
    end = HEADER_END.search(raw)
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


def envelope_recipient(raw: bytes, header: str) -> str:
    """The address in the topmost `header` (e.g. Delivered-To), lower-cased; "" when there is none or it
    holds no plain address. The receiving server prepends it at final delivery, above every header the
    sender wrote; any lower copy of it is the sender's text and never read."""
    head, _ = _head(raw)
    value = _header(head, _field(re.escape(header.encode())), topmost=True)
    try:
        address = parseaddr(value)[1] if value is not None else ""
    except Exception:  # as in envelope_sender: a hostile header must not block the mailbox
        return ""
    if "@" not in address or len(address) > 254 or not address.isprintable() or any(c.isspace() for c in address):
        return ""
    return address.lower()


def mailbox_envelope(raw: bytes, header: str, care_address: str) -> Envelope:
    """The envelope of a message fetched from a mailbox: its envelope_sender, and as recipient the
    envelope_recipient its provider recorded in `header`, else the care address (so no reply token)."""
    return Envelope(envelope_sender(raw), envelope_recipient(raw, header) or care_address)


def message_key(site: str, raw: bytes) -> str:
    """What makes a message the same one again, to be digested (never stored as it is): site, Message-ID
    and the body's SHA-256, so a re-delivery with new trace headers is the same message; without a
    Message-ID the whole raw message is hashed instead."""
    head, content = _head(raw)
    message_id = _header(head, _MESSAGE_ID) or ""
    return f"{site}|{message_id}|{hashlib.sha256(content if message_id else raw).hexdigest()}"
