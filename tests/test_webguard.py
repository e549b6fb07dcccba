"""Who the client behind a web request is: X-Forwarded-For only through trusted proxies, IPv6 by /64."""

from __future__ import annotations

import ipaddress

import pytest

from careservice.intake.webguard import bucket
from careservice.intake.webguard import client_address

PROXIES = (ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),  # not a proxy: its header is the client's own
    ("127.0.0.1", [], "127.0.0.1"),  # a proxy that names no one
    ("127.0.0.1", ["198.51.100.1, 203.0.113.5"], "203.0.113.5"),  # left of the proxy's entry: the client's
    ("127.0.0.1", ["198.51.100.1", "203.0.113.5"], "203.0.113.5"),  # the same in two header lines
    ("127.0.0.1", ["203.0.113.5, 10.1.2.3"], "203.0.113.5"),  # through two trusted proxies
    ("127.0.0.1", ["203.0.113.5, unknown"], "127.0.0.1"),  # not an address: stop at the proxy that passed it
    ("::ffff:127.0.0.1", ["203.0.113.5"], "203.0.113.5"),  # a proxy seen on a dual-stack socket
])
def test_client_address(peer: str, forwarded: list[str], client: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == client


@pytest.mark.parametrize(("address", "key"), [
    ("203.0.113.9", "203.0.113.9"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
    ("::ffff:203.0.113.9", "203.0.113.9"),
])
def test_bucket(address: str, key: str) -> None:
    assert bucket(address) == key
