"""careservice.dkimcheck with an injected resolver: the domains that verify, and a DNS timeout."""

from __future__ import annotations

import dkim
import pytest

from careservice.dkimcheck import DkimUnavailable
from careservice.dkimcheck import verified_domains
from tests.reliability.test_reply_auth import SELECTOR
from tests.reliability.test_reply_auth import dkim_key
from tests.support import customer_mail


def test_only_signatures_that_verify_name_their_domain() -> None:
    records: dict[str, str] = {}
    good, other = dkim_key("staff.example", records), dkim_key("other.example", {})  # other's key is not published
    raw = customer_mail("Re: case", "answer", sender="agent@staff.example")
    for domain, pem in (("other.example", other), ("staff.example", good)):
        raw = dkim.sign(raw, SELECTOR, domain.encode(), pem) + raw
    looked_up: list[bytes] = []

    def resolver(name: bytes, timeout: int = 5) -> bytes | None:
        looked_up.append(name)
        return records.get(name.decode(), "").encode() or None

    assert verified_domains(raw, "staff.example", resolver) == ("staff.example",)
    assert verified_domains(raw, "mail.staff.example", resolver) == ("staff.example",)  # a parent domain
    assert verified_domains(raw.replace(b"answer", b"changed"), "staff.example", resolver) == ()
    looked_up.clear()
    assert verified_domains(raw, "elsewhere.example", resolver) == () and looked_up == []  # none aligned


def test_a_key_lookup_timeout_leaves_the_verdict_open() -> None:
    pem = dkim_key("staff.example", {})
    raw = customer_mail("Re: case", "answer", sender="agent@staff.example")

    def timing_out(name: bytes, timeout: int = 5) -> bytes:
        raise dkim.DnsTimeoutError("timeout")

    with pytest.raises(DkimUnavailable):
        verified_domains(dkim.sign(raw, SELECTOR, b"staff.example", pem) + raw, "staff.example", timing_out)
    assert verified_domains(raw, "staff.example", timing_out) == ()  # unsigned: nothing to look up
