"""DKIM verification of staff replies (dkimpy): which signing domains a message proves.

It looks up keys in DNS, so the runner calls it before the stage (whose inputs are pure) and in a
thread; careservice.staffauth decides what the domains mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import dkim
import dkim.dnsplug
import dkim.util

from careservice.staffauth import aligned

Resolver = Callable[..., bytes | None]  # dkimpy's dnsfunc: (name, timeout=5) -> the TXT record, None if none
MAX_SIGNATURES = 4  # each costs a DNS lookup; a genuine reply carries one or two

# dkimpy logs signing domains and selectors of failing signatures: nothing of a message is logged here
_quiet = logging.getLogger("careservice.dkimcheck.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


class DkimUnavailable(Exception):
    """A key lookup timed out: the verdict is not known yet, so the case is retried, not refused."""


def verified_domains(raw: bytes, from_domain: str, resolver: Resolver | None = None) -> tuple[str, ...]:
    """The d= domains (lower case) of the signatures in `raw` that verify, of those aligned with
    `from_domain` (no other could count, and a sender must not make us look up any domain it likes);
    `resolver` defaults to dkimpy's own (dnspython), looked up when called."""
    lookup = resolver or dkim.dnsplug.get_txt
    timed_out = False

    def recording(name: bytes, timeout: int = 5) -> bytes | None:
        nonlocal timed_out
        try:
            return lookup(name, timeout=timeout)
        except dkim.DnsTimeoutError:
            timed_out = True
            raise

    try:
        checker = dkim.DKIM(raw, logger=_quiet)
    except dkim.DKIMException:
        return ()
    signatures = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    domains = []
    for idx in [i for i, value in enumerate(signatures) if aligned(_signer(value), from_domain)][:MAX_SIGNATURES]:
        try:
            if checker.verify(idx, dnsfunc=recording):
                domains.append(checker.domain.decode("ascii", "replace").lower())
        except dkim.DKIMException:  # a malformed signature or key counts as no signature
            continue
    if timed_out and not domains:
        raise DkimUnavailable("DKIM key lookup timed out")
    return tuple(domains)


def _signer(signature: bytes) -> str:
    """The d= tag of a DKIM-Signature value ("" if it cannot be read)."""
    try:
        return dkim.util.parse_tag_value(signature).get(b"d", b"").decode("ascii", "replace")
    except dkim.util.InvalidTagValueList:
        return ""
