"""TLS in transit: STARTTLS on our listener, and a verified TLS relay (trustme CA, loopback)."""

from __future__ import annotations

import http.client
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import trustme
from aiosmtpd.controller import Controller

from careservice.config import ConfigError
from careservice.config import load_config
from careservice.intake.web import check_web_tls
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import free_port
from tests.support import wait_for
from tests.support import write_config
from tests.webclient import VALID
from tests.webclient import serving


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
            wait_for(lambda: len(sink.received) == 3, what="forwards and ack over verified TLS")
        else:  # an unverifiable certificate is a failed delivery, retried; nothing sent in clear
            wait_for(lambda: "relay_down" in daemon.log.read_text(), what="refused certificate")
            assert sink.received == []
            assert daemon.status()["outbound_queued"] == 3
    finally:
        daemon.stop()


def web_tls_config(tmp: Path, relay_port: int, cert: str, key: str) -> Path:
    """The test config with [web] tls_cert and tls_key as given (paths relative to the config file)."""
    config = write_config(tmp, relay_port)
    config.write_text(config.read_text().replace(
        'verification = "off"', f'verification = "off"\ntls_cert = "{cert}"\ntls_key = "{key}"'))
    return config


def test_contact_form_over_https_with_hsts(tmp_path: Path, ca: trustme.CA, relay: CaptureRelay) -> None:
    chain, key, ca_pem = pem_files(ca, tmp_path)
    config = web_tls_config(tmp_path, relay.port, chain.name, key.name)
    assert load_config(config).web.tls_cert == chain
    daemon = serving(Daemon(config).start())
    try:
        trusting = ssl.create_default_context(cafile=str(ca_pem))
        for host in ("127.0.0.1", "localhost"):
            conn = http.client.HTTPSConnection(host, daemon.web_port, context=trusting, timeout=30)
            try:
                conn.request("GET", "/ticketnest/contact")
                page = conn.getresponse()
                assert page.status == 200 and "Contact TicketNest customer care" in page.read().decode()
                assert page.getheader("Strict-Transport-Security") == "max-age=31536000"
                conn.request("POST", "/ticketnest/contact", body=urlencode(VALID),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
                sent = conn.getresponse()
                sent.read()
                assert (sent.status, sent.getheader("Location")) == (303, "/ticketnest/contact/thanks")
                assert sent.getheader("Strict-Transport-Security") == "max-age=31536000"
            finally:
                conn.close()
        wait_for(lambda: len(relay.to(STAFF)) == 2, what="forwards of the forms sent over HTTPS")
        plain = http.client.HTTPConnection("127.0.0.1", daemon.web_port, timeout=30)
        try:
            with pytest.raises((http.client.HTTPException, OSError)):  # nothing served in clear
                plain.request("GET", "/ticketnest/contact")
                plain.getresponse()
        finally:
            plain.close()
    finally:
        daemon.stop()


def test_web_cert_that_does_not_load_is_named(tmp_path: Path, ca: trustme.CA) -> None:
    chain, key, _ = pem_files(ca, tmp_path)
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    for cert_name, key_name in ((chain.name, other_key.name), ("garbage.pem", key.name), ("missing.pem", key.name)):
        with pytest.raises(ConfigError) as error:
            check_web_tls(load_config(web_tls_config(tmp_path, 1, cert_name, key_name)))
        assert error.value.key == "web.tls_cert", (cert_name, key_name)
    run = subprocess.run([sys.executable, "-m", "careservice", "run", "--config", str(tmp_path / "config.toml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "config error: web.tls_cert: cannot load" in run.stderr


@pytest.mark.parametrize(("given", "named"), [("tls_cert", "web.tls_key"), ("tls_key", "web.tls_cert")])
def test_web_tls_cert_and_key_go_together(tmp_path: Path, given: str, named: str) -> None:
    config = write_config(tmp_path, 1)
    config.write_text(config.read_text().replace('verification = "off"', f'verification = "off"\n{given} = "x.pem"'))
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert error.value.key == named and "go together" in str(error.value)
