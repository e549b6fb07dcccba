"""Guards of the web listener against one client taking it away from everyone: who a client is.

A client is the peer of the connection, or, on a connection from one of web.trusted_proxies, the
address that proxy put into X-Forwarded-For. IPv6 clients count by their /64.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def bucket(address: str) -> str:
    """The key a client's limits count under: its IPv4 address, or the /64 of its IPv6 address, since
    one customer line usually gets a whole /64 and can pick any address in it."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in proxies)


def client_address(peer: str, forwarded: list[str], proxies: tuple[Network, ...]) -> str:
    """The client behind a request: the peer, or while the hop is a trusted proxy, the entry it added
    at the right of X-Forwarded-For. Entries further left came from the client (any value it likes),
    so the walk reads them only through proxies it trusts; an entry that is not an address stops it."""
    entries = [entry.strip() for value in forwarded for entry in value.split(",")]
    hop = peer
    while entries and trusted(hop, proxies):
        entry = entries.pop()
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            break
        hop = entry
    return hop
