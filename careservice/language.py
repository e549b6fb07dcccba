"""Language tags as mail (Content-Language) and browsers (Accept-Language) send them, reduced to the
primary subtag that texts are filed under ("de-CH" is "de"). Untrusted input: bounded, never raises."""

from __future__ import annotations

import re

LANGUAGE = re.compile(r"[a-z]{2,3}")  # an ISO 639 code: a language folder's name, and [[sites]] language
_WEIGHT = re.compile(r"\s*q\s*=\s*([01](?:\.[0-9]{0,3})?)\s*")
MAX_TAGS = 20


def primary(tag: str) -> str:
    """The primary subtag of a language tag in lower case; "" for anything else ("*", "i-klingon", junk)."""
    head = tag.strip().split("-", 1)[0].lower()
    return head if LANGUAGE.fullmatch(head) else ""


def content_languages(value: str) -> tuple[str, ...]:
    """Content-Language (RFC 3282): its tags in their order, each once."""
    return tuple(dict.fromkeys(tag for tag in map(primary, value.split(",")[:MAX_TAGS]) if tag))


def accepted_languages(value: str) -> tuple[str, ...]:
    """Accept-Language (RFC 9110 §12.5.4): its tags best first by weight (equal weights keep their order);
    a tag with q=0 is refused, and a weight that does not parse counts as 1."""
    weighted: dict[str, float] = {}
    for item in value.split(",")[:MAX_TAGS]:
        tag, _, params = item.partition(";")
        weight = _WEIGHT.fullmatch(params)
        q = float(weight.group(1)) if weight else 1.0
        name = primary(tag)
        if name and q > weighted.get(name, 0.0):
            weighted[name] = q
    return tuple(sorted((name for name, q in weighted.items() if q > 0), key=lambda name: -weighted[name]))
