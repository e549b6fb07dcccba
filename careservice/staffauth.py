"""Whether a staff reply proves its From domain, per the site's `staff_auth` (no I/O here).

"none" trusts the reply token and a staff From alone. "dkim" needs a valid DKIM signature whose
d= domain is aligned with the From domain; the signatures are verified before the stage runs
(careservice.dkimcheck: it needs DNS) and come in as the domains that verified. "authres:<id>"
trusts the Authentication-Results header of the MX or provider named <id>, read here.

The Authentication-Results rule (RFC 8601 section 5): the trusted MX removes any header carrying
its own authserv-id and adds its own above everything older, so only the topmost
Authentication-Results header of the whole message counts, and only if its authserv-id is the
configured one; every header below it, and a topmost one from another id, may come from the sender
and is ignored. That header must report `dkim=pass` with an aligned `header.d`, or `dmarc=pass`
with `header.from` equal to the From domain.
"""

from __future__ import annotations

import re

from careservice.mimeparse import HEADER_END

AUTHRES = "authres:"
_AUTH_RESULTS = re.compile(rb"^Authentication-Results[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_COMMENT = re.compile(r"\([^()]*\)")
_QUOTED = re.compile(r'"([^"]*)"')  # a quoted reason may hold ";" or "dkim=pass": only plain tokens stay
_RESULT = re.compile(r"^\s*(dkim|dmarc)\s*=\s*([a-z]+)\b(.*)$", re.IGNORECASE | re.DOTALL)
_PROPERTY = re.compile(r"\bheader\.(d|from)\s*=\s*\"?([^\s\";]+)", re.IGNORECASE)
_AUTHSERV_ID = re.compile(r"[^\s;()\"]+")
MAX_HEAD = 64 * 1024  # the trusted header is prepended: it lies near the top
MAX_RESULTS = 8 * 1024  # a longer topmost header is not read at all (it fails) rather than skipped


def valid_mode(value: str) -> bool:
    if value in ("none", "dkim"):
        return True
    return value.startswith(AUTHRES) and bool(_AUTHSERV_ID.fullmatch(value[len(AUTHRES):]))


def aligned(signer: str, from_domain: str) -> bool:
    """A signing domain vouches for the From domain if it is that domain or a parent of it."""
    signer, from_domain = signer.lower().rstrip("."), from_domain.lower()
    return bool(signer) and "." in signer and (from_domain == signer or from_domain.endswith("." + signer))


def authenticated(mode: str, raw: bytes, from_address: str, dkim_domains: tuple[str, ...]) -> bool:
    """Whether a reply from `from_address` passes `mode`; `dkim_domains` are the d= domains of the
    message's signatures that verified (only looked for in "dkim" mode)."""
    from_domain = from_address.rpartition("@")[2].lower()
    if mode == "none":
        return True
    if mode == "dkim":
        return any(aligned(d, from_domain) for d in dkim_domains)
    if mode.startswith(AUTHRES):
        return _authres_pass(_topmost_results(raw), mode[len(AUTHRES):].lower(), from_domain)
    return False


def _topmost_results(raw: bytes) -> str:
    """The first Authentication-Results value in the header block, unfolded ("" if none or too long)."""
    end = HEADER_END.search(raw, 0, MAX_HEAD)
    match = _AUTH_RESULTS.search(raw, 0, end.start() if end else MAX_HEAD)
    if match is None or len(match.group(1)) > MAX_RESULTS:
        return ""
    return " ".join(match.group(1).decode("utf-8", "replace").split())


def _authres_pass(value: str, authserv_id: str, from_domain: str) -> bool:
    value = _QUOTED.sub(lambda m: m.group(1) if _AUTHSERV_ID.fullmatch(m.group(1)) else " ", value)
    for _ in range(4):  # comments nest; four levels are more than any MX writes
        value = _COMMENT.sub(" ", value)
    head, *results = value.split(";")
    words = head.split()
    if not words or words[0].lower() != authserv_id:
        return False
    for result in results:
        m = _RESULT.match(result)
        if m is None or m.group(2).lower() != "pass":
            continue
        for prop, domain in _PROPERTY.findall(m.group(3)):
            domain = domain.rpartition("@")[2].lower()
            if m.group(1).lower() == "dkim" and prop.lower() == "d" and aligned(domain, from_domain):
                return True
            if m.group(1).lower() == "dmarc" and prop.lower() == "from" and domain == from_domain:
                return True
    return False
