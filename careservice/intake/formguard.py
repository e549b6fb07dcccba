"""Guards of the contact form that hold no request: sealed verification codes and per-client limits."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CODE_DIGITS = 6
MAX_USED_TOKENS = 100_000
MAX_CLIENTS = 10_000
ALL = ""  # the client key of a limit that counts every client together
_TOKEN_BYTES = 8 + 12 + CODE_DIGITS + 16  # expiry, nonce, sealed code with its tag


class CodeTokens:
    """Verification codes sealed in expiring, single-use tokens; no server-side session.

    A token is base64url(expiry ‖ nonce ‖ AES-GCM(code)), its site and expiry authenticated, so
    the client can neither read the code nor move the token to another site or extend it. The
    nonce is the token's id: redeemed ids stay in memory until they expire.
    """

    def __init__(self, key: bytes, ttl: int, clock: Callable[[], float]) -> None:
        self._aead = AESGCM(key)
        self._ttl = ttl
        self._clock = clock
        self._used: OrderedDict[bytes, float] = OrderedDict()

    def issue(self, site_id: str) -> tuple[str, str]:
        """A fresh (token, code) for a form of `site_id`."""
        code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
        expiry = struct.pack(">Q", int(self._clock()) + self._ttl)
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, code.encode(), b"form-code|" + site_id.encode() + b"|" + expiry)
        return base64.urlsafe_b64encode(expiry + nonce + sealed).decode().rstrip("="), code

    def _open(self, site_id: str, token: str) -> tuple[str, bytes, float] | None:
        """(code, token id, expiry) of a token this key sealed for `site_id`, else None."""
        try:
            blob = base64.urlsafe_b64decode(token[:100] + "=" * (-len(token[:100]) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(blob) != _TOKEN_BYTES:
            return None
        expiry, nonce, sealed = blob[:8], blob[8:20], blob[20:]
        try:
            code = self._aead.decrypt(nonce, sealed, b"form-code|" + site_id.encode() + b"|" + expiry)
        except InvalidTag:
            return None
        return code.decode(), nonce, float(struct.unpack(">Q", expiry)[0])

    def reveal(self, site_id: str, token: str) -> str | None:
        """The code to draw for a token that is genuine, unexpired and unused."""
        opened = self._open(site_id, token)
        if opened is None or opened[2] < self._clock() or opened[1] in self._used:
            return None
        return opened[0]

    def redeem(self, site_id: str, token: str, answer: str) -> tuple[str, bytes]:
        """Check `answer` once, right or wrong: ("", token id) when right, else (error code, b"")."""
        opened = self._open(site_id, token)
        if opened is None:
            return "code_invalid", b""
        code, token_id, expiry = opened
        now = self._clock()
        if expiry < now:
            return "code_expired", b""
        if token_id in self._used:
            return "code_used", b""
        self._used[token_id] = expiry
        while self._used and (next(iter(self._used.values())) < now or len(self._used) > MAX_USED_TOKENS):
            self._used.popitem(last=False)
        typed = unicodedata.normalize("NFKC", answer).replace(" ", "")
        if not typed:
            return "code_missing", b""
        return ("", token_id) if hmac.compare_digest(typed.encode(), code.encode()) else ("code_wrong", b"")


class RateLimit:
    """At most `limit` events per client in any `window` seconds, held in memory under a keyed digest of the client."""

    def __init__(self, limit: int, window: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._events: OrderedDict[bytes, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        """The client's events within the window, its entry moved to the most recently used end."""
        key = hashlib.blake2b(client.encode(), key=self._key, digest_size=16).digest()
        events = self._events.pop(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        self._events[key] = events
        while len(self._events) > MAX_CLIENTS:
            self._events.popitem(last=False)
        return events

    def wait(self, client: str) -> float:
        """0.0 when one more event is allowed now, else the seconds until it is; counts nothing."""
        return self._check(client, count=False)

    def take(self, client: str) -> float:
        """Count one event: 0.0 when allowed, else the seconds until the next one is."""
        return self._check(client, count=True)

    def _check(self, client: str, count: bool) -> float:
        now = self._clock()
        events = self._recent(client, now)
        if len(events) >= self.limit:
            return events[0] + self.window - now
        if count:
            events.append(now)
        return 0.0


def take_all(*limits: tuple[RateLimit, str]) -> float:
    """One event for each (limit, client) if every one allows it: 0.0; else the longest wait, counting
    nothing, so a refusal by one limit does not use up the others."""
    wait = max(limit.wait(client) for limit, client in limits)
    if not wait:
        for limit, client in limits:
            limit.take(client)
    return wait
