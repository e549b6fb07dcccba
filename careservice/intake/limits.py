"""What one client or sender may take of the SMTP intake: connections per client address bucket,
bytes per sender and hour."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time
from collections.abc import Callable
from typing import Any

MINUTE = 60.0
WINDOW_MINUTES = 60
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


def sender_bucket(mail_from: str, peer: Any) -> str:
    """Whose hourly quota a transaction counts against: its envelope sender, lower-cased. The null
    sender (bounces, `<>`) has no address to key by, so it counts per client address bucket: one
    host's bounces share a quota, and cannot use up anyone else's."""
    if mail_from in ("", "<>"):
        return f"<>{client_key(peer)}"
    return mail_from.lower()


class SenderQuota:
    """Bytes taken per sender over the last hour, against smtp.max_bytes_per_sender_per_hour.

    A sender is known here only by a keyed digest under a key made at start and held in memory alone,
    so the table can neither be stored nor read back to addresses. Usage is kept per minute, so the
    hour slides; a sender unseen for an hour is forgotten."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._used: dict[bytes, dict[int, int]] = {}  # digest -> {minute: bytes}
        self._forgotten = clock()

    def _digest(self, sender: str) -> bytes:
        return hashlib.blake2b(sender.encode("utf-8", "surrogateescape"), key=self._key, digest_size=16).digest()

    def remaining(self, sender: str) -> int:
        """Bytes `sender` may still send this hour (0 or less: none)."""
        minutes = self._used.get(self._digest(sender))
        if not minutes:
            return self.limit
        oldest = int(self._clock() // MINUTE) - WINDOW_MINUTES
        return self.limit - sum(size for minute, size in minutes.items() if minute > oldest)

    def charge(self, sender: str, size: int) -> bool:
        """Count `size` bytes for `sender` if they fit in what it has left; False (nothing counted) if not."""
        if size > self.remaining(sender):
            return False
        self._add(sender, size)
        return True

    def refund(self, sender: str, size: int) -> None:
        """Take back a charge whose message was not stored after all."""
        self._add(sender, -size)

    def _add(self, sender: str, size: int) -> None:
        now = self._clock()
        minute = int(now // MINUTE)
        minutes = self._used.setdefault(self._digest(sender), {})
        minutes[minute] = minutes.get(minute, 0) + size
        for old in [m for m in minutes if m <= minute - WINDOW_MINUTES]:
            del minutes[old]
        if now - self._forgotten >= MINUTE:
            self._forgotten = now
            for digest in [d for d, used in self._used.items() if max(used) <= minute - WINDOW_MINUTES]:
                del self._used[digest]
