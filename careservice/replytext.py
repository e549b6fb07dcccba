"""What of a staff reply may go to the customer, whatever the mail client did with the quote.

Clients quote the forward in different ways: Outlook puts a header block ("From: ... Sent: ...")
above an unmarked copy, Gmail and Thunderbird quote with `>` under "On ... wrote:", HTML mail marks
the quote with its own elements; staff answer above, below or between the quoted lines. So the rules
hold for any client: an HTML reply loses its quoting elements before it is flattened (and goes as
HTML too only when that shows the same lines); an unmarked copy ends at the forward's last own
line; no `>`-quoted line and
no line of the forward's own blocks (instructions, contact details) is kept; a reply whose
remaining lines are all the forward's, a signature or nothing has no new text; and a first line
that starts with `#` is a command for the service, never text for the customer. A reply the parser
could not read whole, or that carries a mail or one of our reply addresses, is not relayed at all.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from lxml.html import HtmlElement
from mailparser_reply.parser import EmailMessage

from careservice.htmlpart import document, outlook_start, own_html, quotes, to_text
from careservice.mail import Parsed

REPLY_LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "da"]
# What the library lacks: Portuguese ("Em ... escreveu:"; Outlook's "De:", "Enviado:", "Para:",
# "Assunto:"), and Gmail's Spanish "El ... escribió:" (its pattern wants two spaces before "escribió").
_MORE_HEADERS = (r"^(?:> ?)*(?:Em|El)\s(?:.+?\s?.+?)\s?(?:escreveu|escribió):$",
                 r"(?:(?:^|\n)[* ]*(?:De|Enviad[oa](?: em)?|Para|Assunto|Data|Cc):[ *]*.*){2,}(?:\n.*){,1}")
_HEADERS = re.compile("|".join([EmailMessage(text="", languages=list(REPLY_LANGUAGES)).HEADER_REGEX.pattern,
                                *_MORE_HEADERS]), re.MULTILINE | re.IGNORECASE)  # "On ... wrote:", "From: ... Sent:"
COPY_MARK = "-----Original Message-----"  # stands for Outlook's header block in an HTML reply (a header above)
_SEPARATOR = re.compile(r"[\s_\-=~*]*")  # lines of underscores or dashes that clients put above a quote
_COMMAND = re.compile(r"#\s*([^\W_]*)")  # matched at the start of the first line only
_REPLY_TOKEN = re.compile(r"[0-9a-f]{12}\.[0-9a-f]{8}\.[a-z2-7]{16}", re.IGNORECASE)  # careservice.addresses
_REPLY_ADDRESS = re.compile(rf"(?:[\w.-]+\+)?{_REPLY_TOKEN.pattern}(?:@[\w.-]+)?", re.IGNORECASE)
_INVISIBLE = " \t\u00a0\u200b\u200c\u200d\u2060\ufeff"


@dataclass(frozen=True)
class Forwarded:
    """What staff were sent for the case, as normalised lines (see `normalised`)."""

    own: frozenset[str]  # the forward's own blocks: never sent to the customer
    message: frozenset[str]  # the customer's text: not the staff member's new words

    @classmethod
    def of(cls, own_blocks: Iterable[str], message: str) -> Forwarded:
        """`own_blocks`: the forward rendered without the customer's text; `message`: that text."""
        own = {normalised(line) for text in own_blocks for line in text.splitlines()}
        return cls(frozenset(own - {""}), frozenset({normalised(line) for line in message.splitlines()} - {""}))


@dataclass(frozen=True)
class StaffReply:
    text: str  # the new text for the customer ("" when there is none)
    command: str | None = None  # a first line "#word ...": "word" in lower case (None: no such line)
    words: str = ""  # after a command: the rest of its line and the lines below (a note's text, a name)
    html: str = ""  # the same answer as the staff member's HTML, sanitized ("" when it goes as text only)


def normalised(line: str) -> str:
    """A line as compared: compatibility forms folded, case-insensitive, whitespace collapsed
    (HTML rendering and clients change spacing and wrap quotes, not words)."""
    return " ".join(unicodedata.normalize("NFKC", line).casefold().split())


def read_reply(text: str, html: str, forwarded: Forwarded) -> StaffReply:
    """The staff member's own words from a reply's text part or, when it has one, its HTML part."""
    lines = [line for line in _own_lines(text, html, forwarded) if normalised(line) not in forwarded.own]
    start = next((i for i, line in enumerate(lines) if line.strip(_INVISIBLE)), len(lines))
    first = unicodedata.normalize("NFKC", lines[start].strip(_INVISIBLE)) if lines[start:] else ""
    command = _COMMAND.match(first)
    if command:
        return StaffReply("", command.group(1).casefold(), _tidy([first[command.end():].strip(), *lines[start + 1:]]))
    if _says_nothing(lines, forwarded):
        return StaffReply("")
    answer = _tidy(lines)
    return StaffReply(answer, html=_matching_html(html, answer))


def _matching_html(html: str, answer: str) -> str:
    """The reply's own HTML (careservice.htmlpart.own_html) when it shows exactly the lines of
    `answer`, else "": an HTML part that kept a line the text rules dropped (an attribution outside
    the quote, a line of the forward) or lost one they kept (an answer below Outlook's copy of the
    forward) must not go, and the text goes alone."""
    own = own_html(html) if html.strip() else ""
    return own if own and _line_set(to_text(own)) == _line_set(answer) else ""


def _line_set(text: str) -> set[str]:
    return {normalised(line) for line in text.splitlines()} - {""}


def hide_addresses(text: str, staff: Iterable[str], care_address: str) -> str:
    """`text` with every staff address and every reply address (or bare reply token) made the care
    address: signatures and pasted headers must not show the customer either."""
    for address in staff:
        text = re.sub(re.escape(address), care_address, text, flags=re.IGNORECASE)
    return _REPLY_ADDRESS.sub(care_address, text)


def unquoted(text: str, html: str, answered: Forwarded) -> str:
    """A reply's text without what it quotes of `answered`, the mail it answers (a customer's
    follow-up to our acknowledgement), by the same rules as a staff reply."""
    return _tidy(_own_lines(text, html, answered))


def _own_lines(text: str, html: str, forwarded: Forwarded) -> list[str]:
    """The lines of a reply's text part or, when it has one, its HTML part that are not quoted."""
    source = html_text(html) if html.strip() else text  # without a text part, `text` is the HTML as text
    return _unquoted(source, forwarded)


def relay_problem(parsed: Parsed, case_token: str) -> str:
    """Why the reply must not go to the customer at all, as a reason code; "" when it may.

    A reply the parser could not read whole carries its raw self as an attachment (addresses,
    reply token, Received lines); an attached mail (Outlook's "attach item", a forward as
    attachment) is most likely the forward itself; either would show the customer what stays
    with staff. `case_token` is the "<case>.<nonce>" part of the case's reply address."""
    if parsed.defects:
        return "reply_unreadable"
    types = (*parsed.part_types, *(a.content_type for a in parsed.attachments))
    if any(t.startswith("message/") or t == "text/rfc822-headers" for t in types):
        return "reply_attached_mail"
    if any(_names_reply_address(a.data, case_token) for a in parsed.attachments):
        return "reply_address_attached"
    return ""


def _names_reply_address(data: bytes, case_token: str) -> bool:
    """True when `data` holds a reply token of any site or this case's, as text in UTF-8 or in
    UTF-16 (Outlook's .msg files) at either byte alignment."""
    texts = (data.decode("latin-1"), data.decode("utf-16-le", "ignore"), data[1:].decode("utf-16-le", "ignore"))
    return any(_REPLY_TOKEN.search(text) or case_token.lower() in text.lower() for text in texts)


def html_text(html: str) -> str:
    """An HTML reply as plain text: each quoting element one `>` line, Outlook's header block a
    separator line above its unmarked copy of the forward; the text rules below then drop them."""
    root = document(html)
    if root is None:
        return ""
    start = outlook_start(root)
    if start is not None:
        _replace(start, COPY_MARK)
    for quote in quotes(root):
        _replace(quote, ">")
    return to_text(root)


def _replace(el: HtmlElement, text: str) -> None:
    mark = el.makeelement("div", {})
    mark.text = text
    mark.tail = el.tail
    parent = el.getparent()
    if parent is not None:
        parent.replace(el, mark)


def _unquoted(text: str, forwarded: Forwarded) -> list[str]:
    """The lines that are not quoted: `>` lines and the attribution above them ("On ... wrote:")
    go. A header that no `>` quote follows (Outlook's "From: ... Sent: ...", "-----Original
    Message-----") starts an unmarked copy of the forward, which ends at its last line of the
    forward's own blocks: below that, staff may have answered (bottom posting). A copy without such
    a line ends the reply at its header. Separator lines right above a header go with it."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    skip: set[int] = set()
    gaps: set[int] = set()
    end = len(lines)
    for header in _HEADERS.finditer(text):
        begin = header.start() + len(header.group()) - len(header.group().lstrip("\n"))  # not the line above
        first = bisect_right(starts, begin) - 1
        last = bisect_right(starts, max(begin, header.end() - 1)) - 1
        if first in skip or _quoted(lines[first]):
            continue
        while first > 0 and lines[first - 1].strip() and _SEPARATOR.fullmatch(lines[first - 1]):
            first -= 1
        following = next((line for line in lines[last + 1:] if line.strip()), "")
        if following and not _quoted(following):
            copy_end = next((i for i in range(len(lines) - 1, last, -1) if normalised(lines[i]) in forwarded.own), -1)
            if copy_end < 0:
                end = first
                break
            last = copy_end
            gaps.add(first)  # the answers above and below the copy stay apart
        skip.update(range(first, last + 1))
    kept = ["" if i in gaps else line for i, line in enumerate(lines[:end])
            if i in gaps or (i not in skip and not _quoted(line))]
    while kept and _SEPARATOR.fullmatch(kept[-1]):
        kept.pop()
    return kept


def _quoted(line: str) -> bool:
    return unicodedata.normalize("NFKC", line).lstrip(_INVISIBLE).startswith(">")


def _says_nothing(lines: list[str], forwarded: Forwarded) -> bool:
    """True when nothing but the forward's own lines, a signature or whitespace is left."""
    new = [line for line in lines if normalised(line) not in forwarded.message]
    if not any(line.strip(_INVISIBLE) for line in new):
        return True
    parts = EmailMessage(text="\n".join(new), languages=list(REPLY_LANGUAGES), keep_hyphen_lists=True).read()
    return not any(re.search(r"\w", reply.body) for reply in parts.replies)


def _tidy(lines: list[str]) -> str:
    """Trailing spaces gone, runs of blank lines (left where quotes were) made one, ends trimmed."""
    out: list[str] = []
    for line in (line.rstrip() for line in lines):
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n")
