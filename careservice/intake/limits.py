"""What one client may take of the SMTP intake: its address bucket for the per-client connection cap."""

from __future__ import annotations

import ipaddress
from typing import Any

IPV6_PREFIX = 64  # one host or site usually holds a whole /64: counting single IPv6 addresses would be no limit


def client_key(peer: Any) -> str:
    """The bucket a peer address counts against: an IPv4 address, or the IPv6 /64 it lies in (an IPv4
    client on a dual-stack socket arrives as ::ffff:a.b.c.d and counts as that IPv4 address).
    Kept in memory only, never logged."""
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address), IPV6_PREFIX), strict=False))  # int: drops a %zone
    return str(address)
