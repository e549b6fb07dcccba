"""HTML mail: as readable text (for staff, and to read a staff reply), and a staff reply's own HTML as
the customer may see it.

One converter (inscriptis over lxml) turns HTML into text everywhere: paragraphs kept, a link's
target written after its text, `script` and `style` contents dropped. The HTML a customer gets is
the staff member's HTML without the client's quote, sanitized by nh3 so that nothing in it fetches
anything when opened: no remote image, no style element, no `url(...)`, links only to the schemes
in LINK_SCHEMES (remote content tells a sender when and where mail is read).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import escape
from urllib.parse import unquote, urlsplit

import nh3
from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.html_engine import Inscriptis
from inscriptis.model.config import ParserConfig
from lxml.etree import ParserError, tostring
from lxml.html import HtmlElement, HTMLParser, document_fromstring

LINK_SCHEMES = {"http", "https", "mailto", "tel"}  # nothing a client fetches by itself
# Containers of a quote; a Gmail quote container that holds blockquotes may also hold answers
# typed between them (inline answers), so then only its attribution and blockquotes are quotes.
QUOTE_CLASSES = {"moz-cite-prefix", "yahoo_quoted", "gmail_attr"}
GMAIL_CONTAINERS = {"gmail_quote", "gmail_quote_container"}
# Outlook quotes nothing: from its header block on (or the empty div it appends on send) comes an
# unmarked copy of the forward. Outlook on the web marks the block by id, Outlook for Windows by its
# top border (#E1E1E1, #B5C4DF before 2013).
OUTLOOK_IDS = {"divRplyFwdMsg", "appendonsend"}
_OUTLOOK_BORDER = re.compile(r"border-top\s*:\s*solid\s+#(?:e1e1e1|b5c4df)", re.IGNORECASE)
_HEADER_LABEL = re.compile(r"\s*[^\W\d_]{2,20} ?:")  # "From:", "Von:", "De :" at the top of Outlook's block
_INVISIBLE = " \t\u00a0\u200b\u200c\u200d\u2060\ufeff"
_PARSER = HTMLParser(encoding="utf-8", no_network=True)
_RENDER = ParserConfig(css=CSS_PROFILES["strict"])

# What the customer's HTML may hold: nh3's defaults without image maps, inline styles only of
# properties that cannot name a URL, images only from the mail itself (cid:) or inline (data:).
_TAGS = nh3.ALLOWED_TAGS - {"area", "map"}
_ATTRIBUTES = {tag: set(names) - {"cite"} for tag, names in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRIBUTES["*"] = {"style", "dir", "lang", "title"}
_STYLE_PROPERTIES = {
    "color", "background-color", "font-family", "font-size", "font-style", "font-weight", "font-variant",
    "text-align", "text-decoration", "text-indent", "text-transform", "line-height", "letter-spacing",
    "white-space", "vertical-align", "direction", "width", "height", "max-width", "min-width",
    "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
    "padding", "padding-top", "padding-right", "padding-bottom", "padding-left",
    "border", "border-top", "border-right", "border-bottom", "border-left", "border-color", "border-style",
    "border-width", "border-collapse", "border-spacing", "border-radius", "list-style-type", "display",
}
_STYLE_UNSAFE = re.compile(r"url\s*\(|image-set|expression|@import|\\", re.IGNORECASE)  # "\\": escapes spell any
_INLINE_IMAGE = re.compile(r"(?:cid:|data:image/(?:png|gif|jpeg|webp);)", re.IGNORECASE)


def document(html: str) -> HtmlElement | None:
    """`html` parsed (no network, lxml's depth and size limits); None when it holds no element."""
    try:
        return document_fromstring(html.encode("utf-8", "replace"), parser=_PARSER)
    except (ParserError, ValueError):  # nothing but whitespace or comments
        return None


def to_text(html: str | HtmlElement) -> str:
    """HTML as plain text: paragraphs kept, link targets shown as `text <target>`, no script or style."""
    root = document(html) if isinstance(html, str) else html
    if root is None:
        return ""
    for link in root.iter("a"):
        _show_target(link)
    _word_lines(root)
    try:
        return Inscriptis(root, _RENDER).get_text()
    except RecursionError:  # nesting deeper than the renderer recurses: the text without its layout
        return "\n".join(" ".join(t.split()) for t in root.itertext() if t.strip())


def _word_lines(root: HtmlElement) -> None:
    """Word (Outlook for Windows) writes each line as a paragraph that only its style element keeps
    unspaced, and an empty line as one holding "&nbsp;": make them the lines they show."""
    for para in root.iter("p"):
        if "MsoNormal" in (para.get("class") or "").split():
            para.tag = "div"
            if not para.text_content().strip() and para.find(".//img") is None:
                tail = para.tail
                para.clear()
                para.append(para.makeelement("br", {}))
                para.tail = tail


def _show_target(link: HtmlElement) -> None:
    """Write a link's target after its text, as `text <target>`, unless the text is the target."""
    href = (link.get("href") or "").strip()
    if urlsplit(href).scheme.lower() not in LINK_SCHEMES:
        return
    shown = " ".join(link.text_content().split())
    target = unquote(href.removeprefix("mailto:")) if href.lower().startswith("mailto:") else href
    if shown not in (href, target):
        link.tail = f" <{target}>" + (link.tail or "")


def quotes(root: HtmlElement) -> list[HtmlElement]:
    """The quoting elements of a reply, outermost only."""
    return [el for el in root.iter() if _is_quote(el) and not any(map(_is_quote, el.iterancestors()))]


def _is_quote(el: HtmlElement) -> bool:
    if not isinstance(el.tag, str):  # comments and processing instructions
        return False
    classes = set((el.get("class") or "").split())
    if el.tag == "blockquote":
        return (el.get("type") or "").lower() == "cite" or bool(classes & GMAIL_CONTAINERS)
    if classes & GMAIL_CONTAINERS:
        return next(el.iter("blockquote"), None) is None
    return bool(classes & QUOTE_CLASSES)


def outlook_start(root: HtmlElement) -> HtmlElement | None:
    """Where Outlook's copy of the forward starts (its header block, or the `<hr>` above it); None
    when the reply has no such block."""
    start = next((el for el in root.iter() if isinstance(el.tag, str) and (
        el.get("id") in OUTLOOK_IDS or _OUTLOOK_BORDER.search(el.get("style") or ""))), None)
    if start is None:
        return next((hr for hr in root.iter("hr") if _HEADER_LABEL.match(_text_after(hr))), None)
    before = start.getprevious()
    return before if before is not None and before.tag == "hr" else start


def _text_after(el: HtmlElement) -> str:
    following = [el.tail or ""] + [sibling.text_content() for sibling in el.itersiblings()]
    return "".join(following)[:200].lstrip(_INVISIBLE + "\r\n")


def cut_from(start: HtmlElement) -> None:
    """Remove `start` and everything after it in document order."""
    node: HtmlElement | None = start
    while node is not None and node.getparent() is not None:
        for later in list(node.itersiblings()):
            node.getparent().remove(later)
        node.tail = None
        node = node.getparent()
    start.getparent().remove(start)


def own_html(html: str) -> str:
    """The staff member's HTML for the customer: Outlook's copy and every quoting element removed,
    sanitized; "" when no text is left."""
    root = document(html)
    if root is None:
        return ""
    start = outlook_start(root)
    if start is not None:
        cut_from(start)
    for quote in quotes(root):
        quote.drop_tree()  # keeps the text that follows it
    for image in [img for img in root.iter("img") if not _INLINE_IMAGE.match((img.get("src") or "").strip())]:
        image.drop_tree()  # a remote image tells the sender when and where the mail is read
    _word_lines(root)
    body = root.find("body")
    inner = "".join(_serialized(body if body is not None else root))
    clean = nh3.clean(inner, tags=_TAGS, clean_content_tags={"script", "style", "title"},
                      attributes=_ATTRIBUTES, attribute_filter=_attribute, filter_style_properties=_STYLE_PROPERTIES,
                      url_schemes=LINK_SCHEMES | {"cid", "data"}, link_rel=None, strip_comments=True)
    return clean.strip() if to_text(clean).strip(_INVISIBLE + "\r\n") else ""


def _serialized(el: HtmlElement) -> Iterator[str]:
    yield el.text or ""
    for child in el:
        yield tostring(child, encoding="unicode", method="html")  # with its tail


def _attribute(tag: str, name: str, value: str) -> str | None:
    """nh3's filter: a link only to LINK_SCHEMES (a mailto percent-decoded, so an address in it can be
    recognised), an image only from the mail itself, a style only without anything it could fetch."""
    if name == "href":
        scheme = urlsplit(value.strip()).scheme.lower()
        if scheme not in LINK_SCHEMES:
            return None
        return unquote(value) if scheme == "mailto" else value
    if name == "src":
        return value if _INLINE_IMAGE.match(value.strip()) else None
    if name == "style":
        return None if _STYLE_UNSAFE.search(value) else value
    return value


def page(frame: str, slot: str, fragment: str) -> str:
    """An HTML document of the text `frame` (a rendered mail template) with `fragment` where `slot`
    stands in it; "" unless `slot` is there exactly once."""
    before, found, after = frame.partition(slot)
    if not found or slot in after:
        return ""
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n'
            f"{_paragraph(before)}<div>{fragment}</div>\n{_paragraph(after)}</body></html>\n")


def _paragraph(text: str) -> str:
    text = text.strip("\r\n")
    return f"<p>{'<br>'.join(escape(line) for line in text.splitlines())}</p>\n" if text.strip() else ""
