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
    hour slides; a sender unseen for an hour is forgotten with the minutes it was seen in."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._key = secrets.token_bytes(32)
        # a ring of one dict per minute of the hour (minute % 60): a sender costs one small entry per minute
        # it sent in, and a minute's dict is dropped whole when its slot comes round again, with no sweep
        self._hour: list[dict[int, int]] = [{} for _ in range(WINDOW_MINUTES)]
        self._minute = int(clock() // MINUTE)

    def __len__(self) -> int:
        """Senders remembered."""
        self._now()
        return len(set().union(*self._hour))

    def _digest(self, sender: str) -> int:
        digest = hashlib.blake2b(sender.encode("utf-8", "surrogateescape"), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest) >> 4  # 60 bits: the largest int CPython keeps in 32 bytes

    def _now(self) -> dict[int, int]:
        """This minute's usage, once the minutes that left the hour are emptied."""
        minute = int(self._clock() // MINUTE)
        if minute > self._minute:
            for passed in range(max(self._minute, minute - WINDOW_MINUTES) + 1, minute + 1):
                self._hour[passed % WINDOW_MINUTES] = {}
            self._minute = minute
        return self._hour[self._minute % WINDOW_MINUTES]

    def _left(self, digest: int) -> int:
        self._now()
        return self.limit - sum([used[digest] for used in self._hour if digest in used])

    def remaining(self, sender: str) -> int:
        """Bytes `sender` may still send this hour (0 or less: none)."""
        return self._left(self._digest(sender))

    def charge(self, sender: str, size: int) -> bool:
        """Count `size` bytes for `sender` if they fit in what it has left; False (nothing counted) if not."""
        digest = self._digest(sender)
        if size > self._left(digest):
            return False
        self._add(digest, size)
        return True

    def refund(self, sender: str, size: int) -> None:
        """Take back a charge whose message was not stored after all."""
        self._add(self._digest(sender), -size)

    def _add(self, digest: int, size: int) -> None:
        used = self._now()
        total = used.get(digest, 0) + size
        if total:
            used[digest] = total
        else:  # a refund of this minute's charge, or a charge of nothing (a staff reply counts no customer)
            used.pop(digest, None)
