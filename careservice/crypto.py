"""Master key, per-case data keys (AES-256-GCM) and keyed digests derived from the master key."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_ENV = "CARESERVICE_MASTER_KEY"
NONCE_BYTES = 12


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
    text = os.environ.get(MASTER_KEY_ENV)
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
    """Everything keyed by the master key: wrapping case keys, reply tokens, pseudonymous digests."""

    def __init__(self, master: bytes) -> None:
        self._wrap = AESGCM(self._derive(master, b"careservice wrap v1"))
        self._token_key = self._derive(master, b"careservice reply token v1")
        self._digest_key = self._derive(master, b"careservice digest v1")
        self._form_code_key = self._derive(master, b"careservice form code v1")

    @staticmethod
    def _derive(master: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(master)

    def form_code_key(self) -> bytes:
        """The AES-256-GCM key that seals the contact form's verification codes into their tokens."""
        return self._form_code_key

    def new_case_key(self) -> tuple[bytes, bytes]:
        """A fresh data key and its wrapped form for the key store."""
        key = AESGCM.generate_key(bit_length=256)
        return key, self.wrap(key)

    def wrap(self, key: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._wrap.encrypt(nonce, key, b"case-key")

    def unwrap(self, wrapped: bytes) -> bytes:
        return self._wrap.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], b"case-key")

    def sign(self, message: bytes, length: int = 16) -> str:
        """A short base32 HMAC of `message` (for reply tokens)."""
        mac = hmac.new(self._token_key, message, hashlib.sha256).digest()
        return base64.b32encode(mac).decode().rstrip("=").lower()[:length]

    def verify(self, message: bytes, mac: str, length: int = 16) -> bool:
        return hmac.compare_digest(self.sign(message, length), mac)

    def digest(self, value: str) -> bytes:
        """A keyed digest: counts or de-duplicates a value without storing it."""
        return hmac.new(self._digest_key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encrypt with a random nonce; `aad` binds the blob to its row and field."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
