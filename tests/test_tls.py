"""TLS in transit: STARTTLS on our listener, and a verified TLS relay (trustme CA, loopback)."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller

from tests.support import CARE, STAFF, CaptureRelay, Daemon, customer_mail, free_port, wait_for, write_config


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def pem_files(ca: trustme.CA, tmp: Path) -> tuple[Path, Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_pem = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(ca_pem))
    return chain, key, ca_pem


def test_starttls_listener_and_require_tls(tmp_path: Path, ca: trustme.CA, relay: CaptureRelay) -> None:
    chain, key, ca_pem = pem_files(ca, tmp_path)
    config = write_config(tmp_path / "d", relay.port)
    config.write_text(config.read_text().replace(
        "min_free_bytes = 1", f'min_free_bytes = 1\ntls_cert = "{chain}"\ntls_key = "{key}"\nrequire_tls = true'))
    daemon = Daemon(config).start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert client.mail("alice@customer.example")[0] == 530  # plaintext refused
            client.starttls(context=ssl.create_default_context(cafile=str(ca_pem)))
            client.ehlo()
            client.sendmail("alice@customer.example", [CARE], customer_mail("Over TLS", "secret text"))
        wait_for(lambda: relay.to(STAFF), what="forward of mail received over TLS")
    finally:
        daemon.stop()


class _Sink:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.received.append(envelope.original_content)  # type: ignore[attr-defined]
        return "250 OK"


@pytest.fixture
def tls_relay(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[_Sink, int, Path]]:
    chain, key, ca_pem = pem_files(ca, tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain, key)
    sink, port = _Sink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True)
    controller.start()
    try:
        yield sink, port, ca_pem
    finally:
        controller.stop()


@pytest.mark.parametrize("trusted", [True, False])
def test_starttls_relay_is_verified(tmp_path: Path, tls_relay: tuple[_Sink, int, Path], trusted: bool) -> None:
    sink, port, ca_pem = tls_relay
    config = write_config(tmp_path / "d", port, relay_url=f"smtp+starttls://127.0.0.1:{port}")
    if trusted:
        config.write_text(config.read_text().replace("timeout = 10", f'timeout = 10\nca_file = "{ca_pem}"'))
    daemon = Daemon(config).start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
            client.sendmail("alice@customer.example", [CARE], customer_mail("TLS relay", "text"))
        if trusted:
            wait_for(lambda: len(sink.received) == 2, what="forward and ack over verified TLS")
        else:  # an unverifiable certificate is a failed delivery, retried; nothing sent in clear
            wait_for(lambda: "relay_down" in daemon.log.read_text(), what="refused certificate")
            assert sink.received == []
            assert daemon.status()["outbound_queued"] == 2
    finally:
        daemon.stop()
