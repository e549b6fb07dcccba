"""DKIM: each site's mail is signed for its domain as the outbox hands it over, and its keys are made here.

Signing happens at delivery, not when mail is queued, so mail queued before a key rotation (a new
selector and key file, applied by a reload) leaves with the new key. The keys are read when the worker
starts and at each reload: a key file replaced in place takes effect with the next reload.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from careservice.settings import ConfigError, Site

log = logging.getLogger("careservice.dkim")

KEY_BITS = 2048
MIN_KEY_BITS = 1024  # RFC 8301: verifiers ignore signatures by smaller keys
TXT_STRING = 255  # the longest character-string a TXT record holds
CANONICALIZATION = (b"relaxed", b"relaxed")
# What a reader of the mail sees and answers to; From is signed once more than it occurs (below), so that
# nobody can add a second From that some clients would show instead.
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to", b"references",
                  b"mime-version", b"content-type", b"auto-submitted")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


@dataclass(frozen=True)
class SiteKey:
    selector: bytes
    domain: bytes
    pem: bytes


class Signer:
    """Signs a site's mail with that site's key; mail of a site without one leaves as it is."""

    def __init__(self, keys: dict[str, SiteKey]) -> None:
        self.keys = keys

    @classmethod
    def load(cls, sites: tuple[Site, ...]) -> Signer:
        """The keys of every site that names one; ConfigError naming the first that does not load."""
        keys = {site.id: key for i, site in enumerate(sites) if (key := site_key(i, site)) is not None}
        return cls(keys)

    def sign(self, site_id: str, message: bytes) -> bytes:
        """`message` with a DKIM-Signature for its site's domain in front."""
        key = self.keys.get(site_id)
        if key is None:
            return message
        present = {m.group(1).lower() for m in _HEADER_NAME.finditer(message, 0, _header_end(message))}
        headers = [name for name in SIGNED_HEADERS if name in present] + [b"from"]
        try:
            signature = dkim.sign(message, key.selector, key.domain, key.pem, canonicalize=CANONICALIZATION,
                                  include_headers=headers)
        except dkim.DKIMException as exc:  # a stored message our renderer did not write this way: better late than lost
            log.error("dkim_sign_failed site=%s error=%s (sent unsigned)", site_id, type(exc).__name__)
            return message
        return signature + message


def _header_end(message: bytes) -> int:
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end


def site_key(index: int, site: Site) -> SiteKey | None:
    """The site's signing key, None when it has none; ConfigError naming sites[index].dkim_key_file if unusable."""
    if not site.dkim_key_file:
        return None
    key = f"sites[{index}].dkim_key_file"
    try:
        pem = Path(site.dkim_key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {site.dkim_key_file}: {exc.strerror}") from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):  # not PEM, or a key that needs a passphrase
        raise ConfigError(key, f"{site.dkim_key_file} is not an unencrypted PEM private key") from None
    if not isinstance(private, rsa.RSAPrivateKey) or private.key_size < MIN_KEY_BITS:
        raise ConfigError(key, f"{site.dkim_key_file} is not an RSA key of at least {MIN_KEY_BITS} bits")
    # dkimpy reads PKCS#1 and PKCS#8 with its own parser: hand it the form it reads for sure
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return SiteKey(site.dkim_selector.encode(), site.domain.encode(), pem)


def write_key(path: Path) -> rsa.RSAPrivateKey:
    """A new RSA key in `path` (PEM, mode 0600); FileExistsError rather than overwrite one."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return private


def txt_record(selector: str, domain: str, private: rsa.RSAPrivateKey) -> str:
    """The zone-file line that publishes `private`'s public half, in strings of at most 255 characters."""
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    value = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    strings = " ".join(f'"{value[i:i + TXT_STRING]}"' for i in range(0, len(value), TXT_STRING))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"
