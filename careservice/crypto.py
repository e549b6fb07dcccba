"""Master key, per-case data keys (AES-256-GCM), reply-token MACs and the keyed digests of the day."""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_ENV = "CARESERVICE_MASTER_KEY"
NONCE_BYTES = 12
WRAP_VERSION = b"\x02"
WRAPPED_BYTES = 1 + NONCE_BYTES + 32 + 16


class MasterKeyError(Exception):
    """The master key is missing or malformed."""


def write_master_key(path: Path) -> None:
    """Write a fresh random master key (base64) to `path` with mode 0600; refuse to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_master_key(path: Path, create: bool) -> bytes:
    """The 32-byte master key from $CARESERVICE_MASTER_KEY or `path` (created when `create`).

    A key file that group or others may read is refused: whoever can read it can read every case."""
    text = master_key_from_env()
    if text is not None:
        return parse_master_key(text, MASTER_KEY_ENV)
    if create and not path.exists():
        write_master_key(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except OSError as exc:
        raise MasterKeyError(f"security.master_key_file: cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise MasterKeyError(f"security.master_key_file: {path} is readable by others (mode {mode:04o}); "
                             f"chmod 600 {path}")
    return parse_master_key(text, "security.master_key_file")


_env_key: str | None = None


def master_key_from_env() -> str | None:
    """$CARESERVICE_MASTER_KEY, taken out of the environment at the first call so that nothing this
    process starts inherits it (the worker child gets it explicitly: `worker_environment`)."""
    global _env_key
    if MASTER_KEY_ENV in os.environ:
        _env_key = os.environ.pop(MASTER_KEY_ENV)
    return _env_key


def worker_environment() -> dict[str, str]:
    """The environment for the worker child: ours, plus the master key if it came from the environment."""
    key = master_key_from_env()
    return {**os.environ, **({MASTER_KEY_ENV: key} if key is not None else {})}


def parse_master_key(text: str, key: str) -> bytes:
    """32 bytes from base64 `text`; errors name `key` (the setting or variable it came from)."""
    try:
        master = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        master = b""
    if len(master) != 32:
        raise MasterKeyError(f"{key}: expected 32 bytes of base64")
    return master


class Keyring:
    """Everything keyed by the master key: wrapping case keys, reply tokens, pseudonymous digests.

    After `careservice rotate-master-key` the master key file holds the new key and `<file>.old-<date>`
    the previous one until the operator deletes it: while it is there, keys still wrapped under it
    unwrap and reply tokens signed with it verify. A keyring read from a file (`load`) notices the
    file changing before it wraps a key and when an unwrap fails, so a running node follows a rotation.
    """

    def __init__(self, master: bytes, previous: tuple[bytes, ...] = (), source: Path | None = None) -> None:
        self._source = source
        self._stamp = _stamp(source)
        self._use(master, previous)
        self._daily = secrets.token_bytes(32)  # until the store hands over today's (use_daily_secret)

    @classmethod
    def load(cls, path: Path, create: bool) -> Keyring:
        """The keyring of the master key (see load_master_key) and of the old ones kept beside its file."""
        master = load_master_key(path, create)
        if master_key_from_env() is not None:
            return cls(master)
        return cls(master, _old_keys(path), path)

    def _use(self, master: bytes, previous: tuple[bytes, ...]) -> None:
        self._wrap = AESGCM(self._derive(master, b"careservice wrap v1"))
        self._old_wraps = tuple(AESGCM(self._derive(old, b"careservice wrap v1")) for old in previous)
        self._token_keys = tuple(self._derive(key, b"careservice reply token v1") for key in (master, *previous))
        self._token_key = self._token_keys[0]
        self._form_code_key = self._derive(master, b"careservice form code v1")
        self._block_key = self._derive(master, b"careservice sender block v1")

    def refresh(self) -> bool:
        """Read the master key file again if it changed since (a rotation); whether it did."""
        stamp = _stamp(self._source)
        if self._source is None or stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        self._use(load_master_key(self._source, create=False), _old_keys(self._source))
        return True

    @staticmethod
    def _derive(master: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(master)

    def form_code_key(self) -> bytes:
        """The AES-256-GCM key that seals the contact form's verification codes into their tokens."""
        return self._form_code_key

    def new_case_key(self, case_id: str) -> tuple[bytes, bytes]:
        """A fresh data key and its wrapped form for the key store, bound to its case."""
        key = AESGCM.generate_key(bit_length=256)
        return key, self.wrap(key, f"case:{case_id}")

    def wrap(self, key: bytes, label: str) -> bytes:
        """`key` sealed under the master key and bound to `label`: a wrapped key moved to another row
        (another case, another day) does not open."""
        self.refresh()  # a stat: never wrap under a key a rotation has replaced
        nonce = secrets.token_bytes(NONCE_BYTES)
        return WRAP_VERSION + nonce + self._wrap.encrypt(nonce, key, label.encode())

    def unwrap(self, wrapped: bytes, label: str) -> bytes:
        try:
            return self._unwrap(wrapped, label, (self._wrap, *self._old_wraps))
        except InvalidTag:
            if not self.refresh():  # wrapped by a node that has seen a rotation this one has not
                raise
        return self._unwrap(wrapped, label, (self._wrap, *self._old_wraps))

    @property
    def rotating(self) -> bool:
        """Whether previous master keys are kept beside the current one (a rotation not finished)."""
        self.refresh()
        return bool(self._old_wraps)

    def rewrap(self, wrapped: bytes, label: str) -> bytes | None:
        """`wrapped` wrapped under the current master key; None when it already is, or when no key here
        opens it (a node that has the newer key re-wraps it)."""
        try:
            self._unwrap(wrapped, label, (self._wrap,))
            return None
        except InvalidTag:
            pass
        try:
            return self.wrap(self._unwrap(wrapped, label, self._old_wraps), label)
        except InvalidTag:
            return None

    @staticmethod
    def _unwrap(wrapped: bytes, label: str, wraps: tuple[AESGCM, ...]) -> bytes:
        if wrapped[:1] != WRAP_VERSION or len(wrapped) != WRAPPED_BYTES:
            raise InvalidTag()
        for aead in wraps:
            try:
                return aead.decrypt(wrapped[1:1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES:], label.encode())
            except InvalidTag:
                continue
        raise InvalidTag()

    def unwrap_unbound(self, wrapped: bytes) -> bytes:
        """A case key wrapped by version 0.1, under one fixed label (see Store: migrated at start)."""
        return self._wrap.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], b"case-key")

    def sign(self, message: bytes, length: int = 16) -> str:
        """A short base32 HMAC of `message` (for reply tokens)."""
        return _mac(self._token_key, message, length)

    def verify(self, message: bytes, mac: str, length: int = 16) -> bool:
        """Under the current master key or a previous one still kept (replies to mail sent before a rotation)."""
        return any(hmac.compare_digest(_mac(key, message, length), mac) for key in self._token_keys)

    def use_daily_secret(self, secret: bytes) -> None:
        """Key digests with today's random secret (kept wrapped in keys.db until the day ends, then
        deleted, so that no copy of the store can test yesterday's digests)."""
        self._daily = secret

    def block_digest(self, address: str) -> bytes:
        """The keyed digest a "#spam" block is stored under: stable (from the master key, not the day's
        secret) because a block lasts spam.block_days; used for nothing else, so it links to nothing."""
        normal = address.strip().casefold().encode("utf-8", "surrogateescape")
        return hmac.digest(self._block_key, normal, "sha256")

    def digest(self, value: str) -> bytes:
        """A keyed digest: counts or de-duplicates a value without storing it (valid for one day)."""
        return hmac.digest(self._daily, value.encode("utf-8", "surrogateescape"), "sha256")


def _mac(key: bytes, message: bytes, length: int) -> str:
    """The first `length` base32 characters of the HMAC, from only the bytes they encode (base32 turns
    each 5 bytes into 8 characters; encoding all 32 took two thirds of the time)."""
    mac = hmac.digest(key, message, "sha256")[:-(-length // 8) * 5]
    return base64.b32encode(mac).decode().rstrip("=").lower()[:length]


def _stamp(path: Path | None) -> tuple[int, int] | None:
    try:
        return None if path is None else (path.stat().st_ino, path.stat().st_mtime_ns)
    except OSError:
        return None


def old_key_files(path: Path) -> list[Path]:
    """The previous master keys kept beside `path` by rotate-master-key, newest first."""
    return sorted(path.parent.glob(f"{path.name}.old-*"), reverse=True)


def _old_keys(path: Path) -> tuple[bytes, ...]:
    return tuple(parse_master_key(old.read_text(), str(old)) for old in old_key_files(path))


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encrypt with a random nonce; `aad` binds the blob to its row and field."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
