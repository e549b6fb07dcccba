"""Guards of the web listener against one client taking it away from everyone: who a client is, how
many connections it may hold open, and how long it may take to send a request's headers.

A client is the peer of the connection, or, on a connection from one of web.trusted_proxies, the
address that proxy put into X-Forwarded-For. IPv6 clients count by their /64. uvicorn starts no
timer of its own until a request's headers are complete, so without the deadline here a client that
sends half a request line would hold its connection, and one of the server's `limit_concurrency`
slots, for as long as it liked. Open connections are counted per peer address while they are open.
"""

from __future__ import annotations

import ipaddress
import logging
from asyncio import TimerHandle, Transport
from collections import Counter
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

log = logging.getLogger("careservice.web")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _plain(status: str, text: str) -> bytes:
    """A complete response that closes the connection, written outside any request cycle."""
    body = text.encode() + b"\n"
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


TOO_MANY_CONNECTIONS = _plain("429 Too Many Requests", "Too many connections")
REQUEST_TIMEOUT = _plain("408 Request Timeout", "Request timeout")


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


class ConnectionGuard:
    """What the guarded connections share: the limits, and the open connections per client address."""

    def __init__(self, header_timeout: float, per_client: int, proxies: tuple[Network, ...]) -> None:
        self.header_timeout = header_timeout
        self.per_client = per_client
        self.proxies = proxies  # their connections carry every customer's requests: not capped here
        self.open: Counter[str] = Counter()

    def admit(self, peer: str) -> str | None:
        """Count one new connection from `peer`: the key to release it under, or None when refused."""
        if trusted(peer, self.proxies):
            return ""
        key = bucket(peer)
        if self.open[key] >= self.per_client:
            return None
        self.open[key] += 1
        return key

    def release(self, key: str) -> None:
        if key:
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a per-client connection cap and a deadline for each request's headers.

    The deadline starts when the connection opens and again when a response is complete; it passes
    unnoticed once a new request's headers are in (uvicorn then starts a new request cycle). A
    connection still without them gets 408 and is closed, also one that keeps trickling the body of
    a request already answered.
    """

    guard: ConnectionGuard  # set on the class that guarded_protocol() makes for one server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_key: str | None = None
        self._deadline: TimerHandle | None = None
        self._awaited: RequestResponseCycle | None = None

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard_key = self.guard.admit(self.client[0] if self.client else "")
        if self._guard_key is None:
            log.debug("web_refused reason=connections_per_client")
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        if self._guard_key is not None:
            self.guard.release(self._guard_key)
            self._guard_key = None
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_deadline()

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._awaited = self.cycle
        self._deadline = self.loop.call_later(self.guard.header_timeout, self._headers_late)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
        if self.cycle is self._awaited and waiting and not self.transport.is_closing():
            log.debug("web_refused reason=header_timeout")
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class for one server (uvicorn.Config(http=...)), its connections guarded by `guard`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
