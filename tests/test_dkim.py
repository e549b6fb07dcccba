"""DKIM: the daemon signs every kind of mail it sends for a site with a key, verified against the record
`careservice dkim-keygen` prints, served by an offline resolver."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa

from careservice.config import ConfigError
from careservice.config import load_config
from careservice.dkim import Signer
from careservice.model import MailKind
from careservice.model import OutgoingMail
from careservice.outbox import Relay
from careservice.store import QueuedMail
from tests.support import CARE
from tests.support import SITES
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import Captured
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config

CUSTOMER = "alice@customer.example"
Resolver = Callable[..., bytes | None]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "careservice", *args], capture_output=True, text=True, timeout=60)


def dkim_sites(selector: str = "care2026a", key_file: str = "dkim/ticketnest.pem") -> str:
    return SITES.replace('id = "ticketnest"\n', f'id = "ticketnest"\ndkim_selector = "{selector}"\n'
                                                 f'dkim_key_file = "{key_file}"\n', 1)


def keygen(config: Path, *extra: str) -> dict[bytes, bytes]:
    """Run `dkim-keygen` for ticketnest; the DNS it asks for, as {name: TXT value}."""
    result = cli("dkim-keygen", "--site", "ticketnest", "--config", str(config), *extra)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if " IN TXT " in line)
    name, _, strings = line.partition(" IN TXT ")
    parts = re.findall(r'"([^"]*)"', strings)
    assert len(parts) > 1 and all(len(part) <= 255 for part in parts)  # a 2048-bit key needs two strings
    return {name.encode(): "".join(parts).encode()}


def resolver(records: dict[bytes, bytes]) -> Resolver:
    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)
    return txt


def kind(captured: Captured) -> str:
    automatic = "Auto-Submitted" in captured.message
    if STAFF in captured.rcpt_tos:
        return "notice" if automatic else "forward"
    return "ack" if automatic else "answer"


def signature_tags(raw: bytes) -> dict[str, str]:
    signature = str(message_from_bytes(raw)["DKIM-Signature"])
    return {name.strip(): "".join(value.split()) for name, _, value in
            (tag.partition("=") for tag in signature.split(";") if "=" in tag)}


def signed_headers(raw: bytes) -> list[str]:
    return [name.strip() for name in signature_tags(raw)["h"].split(":")]


def test_every_kind_of_mail_verifies_and_a_changed_body_does_not(tmp_path: Path, relay: CaptureRelay) -> None:
    config = write_config(tmp_path, relay.port, sites=dkim_sites())
    dns = resolver(keygen(config))
    assert (tmp_path / "dkim" / "ticketnest.pem").stat().st_mode & 0o777 == 0o600
    daemon = Daemon(config).start()
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Refund", "Order 4711, please"))
        wait_for(lambda: relay.to(STAFF) and relay.to(CUSTOMER), what="forward and acknowledgement")
        forward = relay.to(STAFF)[0].message
        reply_to = forward["Reply-To"].addresses[0].addr_spec
        send(daemon.smtp_port, STAFF, [reply_to], staff_reply(forward, "#what\nnot a marker we know"))
        wait_for(lambda: len(relay.to(STAFF)) == 2, what="notice to staff")
        send(daemon.smtp_port, STAFF, [reply_to], staff_reply(forward, "Your refund is on its way."))
        wait_for(lambda: len(relay.to(CUSTOMER)) == 2, what="answer")
    finally:
        daemon.stop()
    by_kind = {kind(c): c.raw for c in relay.received}
    assert sorted(by_kind) == ["ack", "answer", "forward", "notice"]
    for name, raw in by_kind.items():
        assert dkim.verify(raw, dnsfunc=dns), f"{name} does not verify"
        assert signed_headers(raw).count("from") == 2, f"{name}: From is not over-signed"
        assert {"to", "subject", "date", "message-id"} <= set(signed_headers(raw))
    assert {"reply-to", "references", "in-reply-to"} <= set(signed_headers(by_kind["answer"])) | set(
        signed_headers(by_kind["forward"]))
    assert "auto-submitted" in signed_headers(by_kind["ack"])
    head, body = by_kind["answer"].split(b"\r\n\r\n", 1)
    assert not dkim.verify(head + b"\r\n\r\n" + body.replace(b"refund", b"r3fund"), dnsfunc=dns)
    assert not dkim.verify(by_kind["ack"], dnsfunc=resolver({}))  # no record: the resolver is what vouches


def test_notes_and_reminders_verify_too(tmp_path: Path, relay: CaptureRelay) -> None:
    """The two kinds the test above does not make, a "#note" to the other staff and a reminder, signed as the
    issue fixes it: a 2048-bit RSA key, rsa-sha256, c=relaxed/relaxed, the site's domain and selector."""
    config = write_config(tmp_path, relay.port, sites=dkim_sites(), extra='[retention]\nremind_after = ["2s"]')
    dns = resolver(keygen(config))
    daemon = Daemon(config).start()
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Refund", "Order 4711, please"))
        wait_for(lambda: relay.to(STAFF), what="forward")
        forward = relay.to(STAFF)[0].message
        send(daemon.smtp_port, STAFF, [forward["Reply-To"].addresses[0].addr_spec],
             staff_reply(forward, "#note The receipt follows."))
        wait_for(lambda: [c for c in relay.to(STAFF2) if "receipt follows" in c.raw.decode()], what="note")
        wait_for(lambda: [c for c in relay.to(STAFF) if "Reminder" in str(c.message["Subject"])], what="reminder")
    finally:
        daemon.stop()
    note = next(c.raw for c in relay.to(STAFF2) if "receipt follows" in c.raw.decode())
    reminder = next(c.raw for c in relay.to(STAFF) if "Reminder" in str(c.message["Subject"]))
    key = serialization.load_pem_private_key((tmp_path / "dkim" / "ticketnest.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    for name, raw in (("note", note), ("reminder", reminder)):
        assert dkim.verify(raw, dnsfunc=dns), f"{name} does not verify"
        tags = signature_tags(raw)
        assert (tags["a"], tags["c"], tags["d"], tags["s"]) == ("rsa-sha256", "relaxed/relaxed", "ticketnest.test",
                                                                "care2026a")
        assert signed_headers(raw).count("from") == 2, f"{name}: From is not over-signed"
        assert not dkim.verify(raw + b"Send your card number to evil.example\r\n", dnsfunc=dns), name


def test_mail_of_a_site_without_a_key_is_not_signed(tmp_path: Path, relay: CaptureRelay) -> None:
    config = write_config(tmp_path, relay.port, sites=dkim_sites())
    keygen(config)
    daemon = Daemon(config).start()
    try:
        send(daemon.smtp_port, CUSTOMER, ["care@ixs.test"], customer_mail("Hello", "ixs has no key"))
        wait_for(lambda: relay.to(STAFF) and relay.to(CUSTOMER), what="forward and acknowledgement")
    finally:
        daemon.stop()
    assert all(b"DKIM-Signature" not in c.raw for c in relay.received)


def test_mail_queued_before_a_key_rotation_leaves_with_the_new_key(tmp_path: Path) -> None:
    relay = CaptureRelay()  # not listening yet: the mail waits in the queue
    config = write_config(tmp_path, relay.port, sites=dkim_sites())
    old = keygen(config)
    daemon = Daemon(config).start()
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Refund", "please"))
        wait_for(lambda: "relay_down" in daemon.log.read_text(), what="the relay found down")
        new = keygen(config, "--selector", "care2026b", "--output", str(tmp_path / "dkim" / "care2026b.pem"))
        config.write_text(config.read_text().replace("care2026a", "care2026b").replace(
            "dkim/ticketnest.pem", "dkim/care2026b.pem"))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.log.read_text().count("reloaded sites=") == 2, what="both processes reloaded")
        relay.start()
        wait_for(lambda: relay.to(STAFF) and relay.to(CUSTOMER), what="forward and acknowledgement")
    finally:
        daemon.stop()
        relay.stop()
    for captured in relay.received:
        assert dkim.verify(captured.raw, dnsfunc=resolver(new))
        assert not dkim.verify(captured.raw, dnsfunc=resolver(old))


async def test_the_development_maildir_gets_signed_mail_too(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1, relay_url="maildir:outbox", sites=dkim_sites())
    dns = resolver(keygen(config))
    loaded = load_config(config)
    relay = Relay(loaded.relay, "", Signer.load(loaded.sites))
    message = f"From: <{CARE}>\r\nTo: <{CUSTOMER}>\r\nSubject: hi\r\n\r\nhello\r\n".encode()
    item = QueuedMail(1, "ticketnest", 0, 0.0, OutgoingMail(MailKind.ACK, "case", "", (CUSTOMER,), message, "m@x"))
    results: list[object] = []

    async def record(queued: QueuedMail, refusal: object) -> None:
        results.append(refusal)

    await relay.send_all([item], record)
    assert results == [None]
    [written] = (tmp_path / "outbox" / "new").iterdir()
    assert dkim.verify(written.read_bytes(), dnsfunc=dns)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read"),
    (b"not a key\n", "not an unencrypted PEM private key"),
    (ec.generate_private_key(ec.SECP256R1()).private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()), "not an RSA key"),
])
def test_check_refuses_a_missing_or_unusable_key_naming_it(tmp_path: Path, content: bytes | None,
                                                            problem: str) -> None:
    config = write_config(tmp_path, 1, sites=dkim_sites())
    if content is not None:
        (tmp_path / "dkim").mkdir()
        (tmp_path / "dkim" / "ticketnest.pem").write_bytes(content)
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    assert "sites[0].dkim_key_file: " in result.stderr and problem in result.stderr


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1, sites=dkim_sites())
    keygen(config)
    key = (tmp_path / "dkim" / "ticketnest.pem").read_bytes()
    result = cli("dkim-keygen", "--site", "ticketnest", "--config", str(config))
    assert result.returncode == 1 and "not overwriting" in result.stderr
    assert (tmp_path / "dkim" / "ticketnest.pem").read_bytes() == key
    assert cli("check", "--config", str(config)).returncode == 0


@pytest.mark.parametrize(("lines", "key"), [
    ('dkim_selector = "care2026a"', "sites[0].dkim_key_file"),
    ('dkim_key_file = "k.pem"', "sites[0].dkim_selector"),
    ('dkim_selector = "Care_2026"\ndkim_key_file = "k.pem"', "sites[0].dkim_selector"),
])
def test_dkim_settings_go_together_and_selectors_are_dns_labels(tmp_path: Path, lines: str, key: str) -> None:
    config = write_config(tmp_path, 1, sites=SITES.replace('id = "ticketnest"\n', f'id = "ticketnest"\n{lines}\n', 1))
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert raised.value.key == key
