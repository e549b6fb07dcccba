"""Mail core over real sockets: intake, relay-refusal, size limits, durability, retries, residue."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import wait_for
from tests.support import write_config


def test_mail_is_forwarded_and_acknowledged(daemon: Daemon, relay: CaptureRelay) -> None:
    send(daemon.smtp_port, "alice@customer.example", [CARE], customer_mail("Lost tickets", "Order 4711 is lost"))
    wait_for(lambda: relay.to(STAFF) and relay.to("alice@customer.example"), what="forward and ack")
    forward = relay.to(STAFF)[0].message
    assert "Order 4711 is lost" in forward.get_body(("plain",)).get_content()
    assert str(forward["Reply-To"]).startswith("care+")
    assert daemon.status()["open_cases"] == 1


@pytest.mark.parametrize("rcpt", [
    "victim@example.net", "care@ticketnest.test.evil.example", "care%victim.example@ticketnest.test",
    '"victim@example.net"@ticketnest.test', "@ticketnest.test:victim@example.net", "other@ticketnest.test",
    "care+notatoken@ticketnest.test", "postmaster@ticketnest.test",
])
def test_foreign_recipients_are_refused(daemon: Daemon, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
        client.ehlo()
        client.mail("spammer@example.org")
        code, text = client.rcpt(rcpt)
    assert (code, text[:5]) in ((550, b"5.7.1"), (501, b"5.5.4")) or code >= 500, (code, text)


def test_oversized_message_is_refused(daemon: Daemon) -> None:
    big = customer_mail("big", ("x" * 70 + "\n") * 4000)
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
        assert "size 200000" in client.ehlo()[1].decode().lower()
        assert client.mail("alice@customer.example", ["SIZE=900000"])[0] == 552
        assert client.mail("alice@customer.example")[0] == 250  # no SIZE given: refused after DATA
        assert client.rcpt(CARE)[0] == 250
        assert client.data(big)[0] == 552
    assert daemon.status() == {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0}


def test_kill_after_250_with_relay_down_delivers_exactly_once(tmp_path: Path, config: Path,
                                                              relay: CaptureRelay) -> None:
    relay.stop()
    proc = Daemon(config).start()
    send(proc.smtp_port, "alice@customer.example", [CARE], customer_mail("Refund", "Please refund 4711"))
    proc.kill()
    relay.start()
    proc.start()
    try:
        wait_for(lambda: relay.to(STAFF) and relay.to("alice@customer.example"), what="delivery after restart")
        wait_for(lambda: proc.status()["outbound_queued"] == 0, what="empty queue")
        assert len(relay.to(STAFF)) == 1
        assert len(relay.to("alice@customer.example")) == 1
    finally:
        proc.stop()


def test_relay_451_then_recovers(config: Path, relay: CaptureRelay) -> None:
    relay.replies = ["451 4.3.0 try later"] * 3
    proc = Daemon(config).start()
    try:
        send(proc.smtp_port, "alice@customer.example", [CARE], customer_mail("Refund", "Please refund"))
        wait_for(lambda: relay.to(STAFF) and relay.to("alice@customer.example"), what="delivery after 451s")
        assert relay.attempts >= 5
    finally:
        proc.stop()


def test_nothing_personal_in_clear_on_disk_or_in_log(daemon: Daemon, relay: CaptureRelay) -> None:
    relay.stop()  # keep everything queued in the store
    raw = customer_mail("Secret subject zebra", "Body text quokka", sender="marker.person@customer.example",
                        name="Wilhelmina Markername")
    send(daemon.smtp_port, "marker.person@customer.example", [CARE], raw)
    wait_for(lambda: daemon.status()["outbound_queued"] == 3, what="a forward per staff address and the ack")
    needles = [b"marker.person", b"Wilhelmina", b"Markername", b"zebra", b"quokka", STAFF.encode()]
    assert files_containing(daemon.data_dir, needles) == []
    assert not [n for n in needles if n in daemon.log.read_bytes()]


def test_status_json_while_running(daemon: Daemon) -> None:
    assert daemon.status() == {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "careservice", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("patch", "message"), [
    (('url = "smtp://', 'url = "smpt://'), 'relay.url: unknown scheme "smpt"'),
    (('listen = "127.0.0.1:', 'listen = "nowhere'), "smtp.listen: expected"),
    (("max_message_bytes = 200000", 'max_message_bytes = "big"'), "smtp.max_message_bytes: expected an integer"),
    (('care_address = "care@ixs.test"', 'care_address = "care@other.test"'), "sites[1].care_address"),
    (("retry_delays = [1, 1, 2]", "retry_delays = []"), "relay.retry_delays"),
    (('verification = "off"', 'verification = "maybe"'), "web.verification"),
])
def test_config_errors_name_the_key(config: Path, patch: tuple[str, str], message: str) -> None:
    config.write_text(config.read_text().replace(*patch, 1))
    for command in ("check", "run"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 2, result
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_check_keygen_and_missing_config(tmp_path: Path, config: Path) -> None:
    assert run_cli("check", "--config", str(config)).returncode == 0
    key = tmp_path / "k" / "master.key"
    assert run_cli("keygen", "--config", str(config), "--output", str(key)).returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    again = run_cli("keygen", "--config", str(config), "--output", str(key))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    missing = run_cli("check", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "config: file not found" in missing.stderr


def test_dead_relay_gets_one_probe_per_interval(tmp_path: Path) -> None:
    """A relay that drops every connection: the queue probes it once per retry interval, not per mail."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    listener.settimeout(0.2)
    connections: list[float] = []
    config = write_config(tmp_path, listener.getsockname()[1], retry_delays="[2]")
    proc = Daemon(config).start()
    try:
        for i in range(4):
            send(proc.smtp_port, "alice@customer.example", [CARE], customer_mail(f"Case {i}", "text"))
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            try:
                listener.accept()[0].close()
                connections.append(time.monotonic())
            except TimeoutError:
                pass
        assert proc.status()["outbound_queued"] == 12  # per case: a forward per staff address (2), an ack
    finally:
        proc.stop()
        listener.close()
    # the first round may open one connection per parallel sender; after that, one probe per 2 s interval
    # (8 mails queued: per-mail retries would make 8 connections per interval)
    later = [t - connections[0] for t in connections if t - connections[0] > 1.0]
    assert connections and len(later) <= 4, later
