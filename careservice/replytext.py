"""What of a staff reply may go to the customer, whatever the mail client did with the quote.

Clients quote the forward in different ways: Outlook puts a header block ("From: ... Sent: ...")
above an unmarked copy, Gmail and Thunderbird quote with `>` under "On ... wrote:" (and staff may
answer below the quote), HTML mail marks the quote with its own elements. So the rules hold for
any client: an HTML reply loses its quoting elements before it is flattened; no `>`-quoted line and
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
from urllib.parse import urlsplit

from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.html_engine import Inscriptis
from inscriptis.model.config import ParserConfig
from lxml.etree import ParserError
from lxml.html import HtmlElement, HTMLParser, document_fromstring
from mailparser_reply.parser import EmailMessage

from careservice.mail import Parsed

REPLY_LANGUAGES = ["en", "de", "fr", "es", "it", "nl"]
LINK_SCHEMES = {"http", "https", "mailto", "tel"}
QUOTE_CLASSES = {"gmail_quote", "gmail_quote_container", "moz-cite-prefix", "yahoo_quoted"}
OUTLOOK_HEADER_ID = "divRplyFwdMsg"
_HEADERS = EmailMessage(text="", languages=list(REPLY_LANGUAGES)).HEADER_REGEX  # "On ... wrote:", "From: ... Sent:"
_HEADER_LABEL = re.compile(r"\s*[^\W\d_]{2,20} ?:")  # "From:", "Von:", "De :" at the top of Outlook's block
_SEPARATOR = re.compile(r"[\s_\-=~*]*")  # lines of underscores or dashes that clients put above a quote
_COMMAND = re.compile(r"#\s*([^\W_]*)")  # matched at the start of the first line only
_REPLY_TOKEN = re.compile(r"[0-9a-f]{12}\.[0-9a-f]{8}\.[a-z2-7]{16}", re.IGNORECASE)  # careservice.addresses
_INVISIBLE = " \t\u00a0\u200b\u200c\u200d\u2060\ufeff"
_PARSER = HTMLParser(encoding="utf-8", no_network=True)
_RENDER = ParserConfig(css=CSS_PROFILES["strict"])


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


def normalised(line: str) -> str:
    """A line as compared: compatibility forms folded, case-insensitive, whitespace collapsed
    (HTML rendering and clients change spacing and wrap quotes, not words)."""
    return " ".join(unicodedata.normalize("NFKC", line).casefold().split())


def read_reply(text: str, html: str, forwarded: Forwarded) -> StaffReply:
    """The staff member's own words from a reply's text part or, when it has one, its HTML part."""
    lines = [line for line in _own_lines(text, html) if normalised(line) not in forwarded.own]
    start = next((i for i, line in enumerate(lines) if line.strip(_INVISIBLE)), len(lines))
    first = unicodedata.normalize("NFKC", lines[start].strip(_INVISIBLE)) if lines[start:] else ""
    command = _COMMAND.match(first)
    if command:
        return StaffReply("", command.group(1).casefold(), _tidy([first[command.end():].strip(), *lines[start + 1:]]))
    if _says_nothing(lines, forwarded):
        return StaffReply("")
    return StaffReply(_tidy(lines))


def unquoted(text: str, html: str) -> str:
    """A reply's text without what it quotes of the mail it answers (a customer's follow-up to our
    acknowledgement), by the same rules as a staff reply."""
    return _tidy(_own_lines(text, html))


def _own_lines(text: str, html: str) -> list[str]:
    """The lines of a reply's text part or, when it has one, its HTML part that are not quoted."""
    return _unquoted(html_text(html) if html.strip() else text)  # without a text part, `text` is the HTML untagged


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
    """An HTML reply as plain text with paragraphs and link targets, its quoting elements removed."""
    try:
        root = document_fromstring(html.encode("utf-8", "replace"), parser=_PARSER)
    except (ParserError, ValueError):  # nothing but whitespace or comments
        return ""
    _cut_outlook_header(root)
    for quote in [el for el in root.iter() if _is_quote(el) and not any(map(_is_quote, el.iterancestors()))]:
        _mark_quoted(quote)
    for link in root.iter("a"):
        _show_target(link)
    return Inscriptis(root, _RENDER).get_text()


def _is_quote(el: HtmlElement) -> bool:
    if not isinstance(el.tag, str):  # comments and processing instructions
        return False
    classes = set((el.get("class") or "").split())
    return bool(classes & QUOTE_CLASSES) or (el.tag == "blockquote" and (el.get("type") or "").lower() == "cite")


def _mark_quoted(el: HtmlElement) -> None:
    """Replace a quoting element by one `>` line: the text rules below then drop it, and the
    attribution line above it ("On ... wrote:"), as in a text reply."""
    mark = el.makeelement("div", {})
    mark.text = ">"
    mark.tail = el.tail
    parent = el.getparent()
    if parent is not None:
        parent.replace(el, mark)


def _cut_outlook_header(root: HtmlElement) -> None:
    """Outlook quotes nothing: below its header block (`divRplyFwdMsg`, or an `<hr>` followed by
    "From: ...") comes the forward itself, so everything from there on goes."""
    start = next(iter(root.iterfind(f".//*[@id='{OUTLOOK_HEADER_ID}']")), None)
    if start is None:
        start = next((hr for hr in root.iter("hr") if _HEADER_LABEL.match(_text_after(hr))), None)
    elif (before := start.getprevious()) is not None and before.tag == "hr":
        start = before
    if start is None:
        return
    node: HtmlElement | None = start
    while node is not None and node.getparent() is not None:
        for later in list(node.itersiblings()):
            node.getparent().remove(later)
        node.tail = None
        node = node.getparent()
    start.getparent().remove(start)


def _text_after(el: HtmlElement) -> str:
    following = [el.tail or ""] + [sibling.text_content() for sibling in el.itersiblings()]
    return "".join(following)[:200].lstrip(_INVISIBLE + "\r\n")


def _show_target(link: HtmlElement) -> None:
    """Write a link's target after its text, as `text <target>`, unless the text is the target."""
    href = (link.get("href") or "").strip()
    if urlsplit(href).scheme.lower() not in LINK_SCHEMES:
        return
    shown = " ".join(link.text_content().split())
    target = href.removeprefix("mailto:")
    if shown not in (href, target):
        link.tail = f" <{target}>" + (link.tail or "")


def _unquoted(text: str) -> list[str]:
    """The lines that are not quoted: `>` lines and the attribution above them ("On ... wrote:")
    go; a header that no `>` quote follows (Outlook's "From: ... Sent: ...", "-----Original
    Message-----") starts an unmarked copy of the forward, so the reply ends there."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    skip: set[int] = set()
    end = len(lines)
    for header in _HEADERS.finditer(text):
        first = bisect_right(starts, header.start()) - 1
        last = bisect_right(starts, max(header.start(), header.end() - 1)) - 1
        if first in skip or _quoted(lines[first]):
            continue
        following = next((line for line in lines[last + 1:] if line.strip()), "")
        if following and not _quoted(following):
            end = first
            break
        skip.update(range(first, last + 1))
    kept = [line for i, line in enumerate(lines[:end]) if i not in skip and not _quoted(line)]
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
