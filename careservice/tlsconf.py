"""TLS contexts, built one way for every listener and every connection we make (stdlib defaults:
certificates and host names verified, no SSLv3/TLS 1.0)."""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """For a listener (SMTP STARTTLS, the web form): raises OSError/ssl.SSLError when the pair does not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def client_context(ca_file: str = "", verify: bool = True) -> ssl.SSLContext:
    """For a connection we open (the relay, IMAP): the system CAs plus `ca_file`; `verify` False is for
    tests only (imap.verify_tls = false)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
