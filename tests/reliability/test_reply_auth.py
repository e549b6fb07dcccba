"""Staff reply authentication against the real daemon over SMTP: staff_auth "dkim" with a test key whose
TXT record the daemon's resolver serves (tests/dkimdns), and "authres:<authserv-id>"."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.reliability.mailclients import thunderbird
from tests.reliability.replycase import answers
from tests.reliability.replycase import case_id
from tests.reliability.replycase import new_text
from tests.reliability.replycase import notices
from tests.reliability.replycase import reply_address
from tests.reliability.replycase import settled
from tests.support import CARE
from tests.support import SITES
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability
SELECTOR = b"care2025"
MX = "mx.care.test"


def dkim_key(domain: str, records: dict[str, str]) -> bytes:
    """A new RSA key for `domain`, its TXT record added to `records`; the private key in PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    records[f"{SELECTOR.decode()}._domainkey.{domain}."] = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    records: dict[str, str] = {}
    pems = {domain: dkim_key(domain, records) for domain in ("staff.example", "elsewhere.example")}
    path = tmp_path_factory.mktemp("dns") / "txt.json"
    path.write_text(json.dumps(records))
    return path, pems


@pytest.fixture(scope="module")
def served(keys: tuple[Path, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Daemon, CaptureRelay]]:
    """ticketnest asks for DKIM, ixs for the Authentication-Results of MX."""
    sites = SITES.replace('staff = ["', 'staff_auth = "dkim"\nstaff = ["', 1)
    ixs = 'care_address = "care@ixs.test"\n'
    sites = sites.replace(ixs, f'{ixs}staff_auth = "authres:{MX}"\n')
    relay = CaptureRelay().start()
    env = {"PYTHONPATH": str(Path(__file__).parents[1] / "dkimdns"), "CARESERVICE_TEST_DKIM_TXT": str(keys[0])}
    daemon = Daemon(write_config(tmp_path_factory.mktemp("auth"), relay.port, sites=sites), env=env).start()
    try:
        yield daemon, relay
    finally:
        daemon.stop()
        relay.stop()


def opened(daemon: Daemon, relay: CaptureRelay, customer: str, care: str = CARE) -> EmailMessage:
    send(daemon.smtp_port, customer, [care], customer_mail("Lost order", "Order 4711", sender=customer).replace(
        CARE.encode(), care.encode()))
    wait_for(lambda: relay.to(customer), what="acknowledgement")
    settled(daemon)
    return [c.message for c in relay.to(STAFF) if customer in c.message.get_body(("plain",)).get_content()][-1]


def signed(raw: bytes, domain: str, pem: bytes) -> bytes:
    return dkim.sign(raw, SELECTOR, domain.encode(), pem, include_headers=[b"from", b"to", b"subject"]) + raw


def refused_notice(relay: CaptureRelay, forward: EmailMessage) -> str:
    [notice] = notices(relay, STAFF, case_id(forward))
    return notice.get_body(("plain",)).get_content()


def test_a_reply_signed_by_the_staff_domain_is_relayed(served: tuple[Daemon, CaptureRelay],
                                                       keys: tuple[Path, dict[str, bytes]]) -> None:
    daemon, relay = served
    forward = opened(daemon, relay, "signed@customer.example")
    send(daemon.smtp_port, STAFF, [reply_address(forward)],
         signed(thunderbird(forward, "Signed answer"), "staff.example", keys[1]["staff.example"]))
    settled(daemon)
    assert [new_text(a) for a in answers(relay, "signed@customer.example")] == ["Signed answer"]


@pytest.mark.parametrize("signer", ["", "elsewhere.example"])
def test_an_unsigned_or_foreign_signed_reply_is_refused_with_a_notice(
        served: tuple[Daemon, CaptureRelay], keys: tuple[Path, dict[str, bytes]], signer: str) -> None:
    daemon, relay = served
    customer = f"unsigned-{signer or 'none'}@customer.example"
    forward = opened(daemon, relay, customer)
    raw = thunderbird(forward, "FORGED answer")
    send(daemon.smtp_port, STAFF, [reply_address(forward)], signed(raw, signer, keys[1][signer]) if signer else raw)
    settled(daemon)
    assert answers(relay, customer) == []
    assert "proof of its sender" in refused_notice(relay, forward)
    assert "reason=reply_unauthenticated" in daemon.log.read_text()


TRUSTED = f"Authentication-Results: {MX}; dkim=pass header.d=staff.example\r\n".encode()
FORGED = TRUSTED  # a sender can write the very line the MX would
FAILED = f"Authentication-Results: {MX}; dkim=none; dmarc=fail header.from=staff.example\r\n".encode()


@pytest.mark.parametrize(("headers", "relayed"), [(TRUSTED, True), (FAILED + FORGED, False), (b"", False)])
def test_authres_trusts_only_the_topmost_header_of_its_mx(served: tuple[Daemon, CaptureRelay], headers: bytes,
                                                          relayed: bool) -> None:
    daemon, relay = served
    customer = f"authres-{len(headers)}@customer.example"
    forward = opened(daemon, relay, customer, care="care@ixs.test")
    send(daemon.smtp_port, STAFF, [reply_address(forward)], headers + thunderbird(forward, "MX answer"))
    settled(daemon)
    assert [new_text(a) for a in answers(relay, customer)] == (["MX answer"] if relayed else [])
    if not relayed:  # the forged pass below the MX's own failing header changed nothing
        assert "proof of its sender" in refused_notice(relay, forward)


def test_a_token_of_one_staff_member_is_refused_from_another(served: tuple[Daemon, CaptureRelay],
                                                            keys: tuple[Path, dict[str, bytes]]) -> None:
    daemon, relay = served
    customer = "borrowed@customer.example"
    forward = opened(daemon, relay, customer)  # the copy STAFF got; STAFF2 (same domain, signed) uses it
    raw = thunderbird(forward, "Borrowed answer", sender=STAFF2)
    send(daemon.smtp_port, STAFF2, [reply_address(forward)], signed(raw, "staff.example", keys[1]["staff.example"]))
    settled(daemon)
    assert answers(relay, customer) == []
    [notice] = notices(relay, STAFF2, case_id(forward))
    assert "issued to another staff member" in notice.get_body(("plain",)).get_content()
