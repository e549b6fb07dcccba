"""Stop, restart, reload and the systemd protocol, against the daemon as a real process on loopback."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.helpers import set_keys
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import wait_for
from tests.support import write_config

STOP_TIMEOUT = 10
SENDERS = 10


class Sender(threading.Thread):
    """Sends numbered mails until the daemon refuses connections; every outcome is counted by kind."""

    def __init__(self, number: int, port: int, per_connection: int) -> None:
        super().__init__(daemon=True)
        self.number = number
        self.port = port
        self.per_connection = per_connection
        self.accepted: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.details: list[str] = []  # what the client saw, for a failure message
        self.stop_at = time.monotonic() + 60

    def run(self) -> None:
        n = 0
        while time.monotonic() < self.stop_at:
            try:
                client = smtplib.SMTP(timeout=30)
                code, _ = client.connect("127.0.0.1", self.port)
            except ConnectionRefusedError:
                self.outcomes["refused"] += 1
                return
            except (OSError, smtplib.SMTPException):  # closed before the greeting: no transaction began
                self.outcomes["refused"] += 1
                return
            try:
                greeting, text = code, b""
                if code == 220:
                    code, text = client.ehlo()  # explicit: after a 421 to EHLO, sendmail would try HELO
                if code != 250:
                    self.outcomes[str(code)] += 1
                    if code not in (421,):
                        self.details.append(f"greeting={greeting} ehlo={code} {text!r}")
                    return
                for _ in range(self.per_connection):
                    n += 1
                    tag = f"load-{self.number}-{n}"
                    try:
                        client.sendmail(f"s{self.number}@customer.example", [CARE],
                                        customer_mail(tag, "load", sender=f"s{self.number}@customer.example"))
                    except smtplib.SMTPResponseException as exc:
                        self.outcomes[str(exc.smtp_code)] += 1
                        self.details.append(f"{type(exc).__name__} {exc.smtp_code} {exc.smtp_error!r}")
                        return
                    except smtplib.SMTPRecipientsRefused as exc:  # smtplib's word for a 421 to RCPT
                        self.outcomes[",".join(str(code) for code, _ in exc.recipients.values())] += 1
                        return
                    except (OSError, smtplib.SMTPException) as exc:  # a reset or a close without 421
                        self.outcomes[f"send:{type(exc).__name__}"] += 1
                        return
                    self.accepted.append(tag)
                    self.outcomes["250"] += 1
                try:
                    code, _ = client.docmd("QUIT")
                    self.outcomes["quit:" + str(code)] += 1
                except (OSError, smtplib.SMTPException) as exc:
                    self.outcomes[f"quit:{type(exc).__name__}"] += 1
            finally:
                client.close()


def test_sigterm_under_load_loses_nothing_and_resets_nobody(tmp_path: Path, relay: CaptureRelay) -> None:
    config = set_keys(write_config(tmp_path, relay.port), "service", stop_timeout=STOP_TIMEOUT)
    daemon = Daemon(config).start()
    senders = [Sender(i, daemon.smtp_port, per_connection=1 + i % 3) for i in range(SENDERS)]
    for sender in senders:
        sender.start()
    wait_for(lambda: sum(len(s.accepted) for s in senders) >= 50, what="some load accepted")
    assert daemon.proc is not None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(STOP_TIMEOUT + 10)
    took = time.monotonic() - started
    daemon.proc = None
    for sender in senders:
        sender.join(30)
    outcomes = sum((s.outcomes for s in senders), Counter())
    accepted = [tag for s in senders for tag in s.accepted]
    print(f"\nsigterm under load: sent={sum(outcomes[k] for k in outcomes if not k.startswith('quit:'))} "
          f"outcomes={dict(outcomes)} exit={code} seconds={took:.1f}")
    assert code == 0 and took < STOP_TIMEOUT
    unexpected = {k: v for k, v in outcomes.items() if k not in ("250", "421", "refused", "quit:221", "quit:421")}
    assert unexpected == {}, (outcomes, [d for s in senders for d in s.details])
    log = daemon.log.read_text()
    assert "Traceback" not in log and "worker_exited" not in log
    daemon.start()  # the restart forwards what was committed and not yet forwarded
    try:
        def forwarded() -> Counter[str]:
            return Counter(str(c.message["Subject"]).split("] ", 1)[-1] for c in relay.to(STAFF))

        wait_for(lambda: set(accepted) <= set(forwarded()), timeout=60, what="every accepted mail forwarded")
        wait_for(lambda: daemon.status()["inbound_pending"] == 0 and daemon.status()["outbound_queued"] == 0,
                 what="queues empty")
        counts = forwarded()
        lost = [tag for tag in accepted if tag not in counts]
        duplicated = {tag: n for tag, n in counts.items() if n > 1}
        print(f"accepted={len(accepted)} forwarded={sum(counts.values())} lost={len(lost)} "
              f"duplicated={len(duplicated)}")
        assert lost == [] and duplicated == {}
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_to_the_process_group_is_a_quiet_stop(tmp_path: Path, relay: CaptureRelay, loop: str) -> None:
    """systemd and Ctrl-C signal the worker too: it drains itself, and the daemon does not restart it.
    On uvloop, the customer's closed session could still be draining: 421 after its EOF raised in aiosmtpd."""
    daemon = Daemon(set_keys(write_config(tmp_path, relay.port), "service", event_loop=loop))
    log = daemon.log.open("ab")
    daemon.proc = subprocess.Popen([sys.executable, "-m", "careservice", "run", "--config", str(daemon.config)],
                                   stdout=log, stderr=log, start_new_session=True)
    log.close()
    wait_for(daemon._listening, what="daemon SMTP port")
    send(daemon.smtp_port, "a@customer.example", [CARE], customer_mail("Group", "stop"))
    wait_for(lambda: relay.to(STAFF), what="forward")
    wait_for(lambda: "worker" in _children(daemon.proc.pid), what="worker child")
    os.killpg(daemon.proc.pid, signal.SIGTERM)
    assert daemon.proc.wait(STOP_TIMEOUT + 30) == 0
    daemon.proc = None
    text = daemon.log.read_text()
    assert "worker_exited" not in text and " ERROR " not in text, text


def _children(pid: int) -> str:
    out = subprocess.run(["ps", "-o", "args=", "--ppid", str(pid)], capture_output=True, text=True)
    return out.stdout


def test_sighup_reloads_staff_and_keeps_a_bad_config_out(tmp_path: Path, relay: CaptureRelay) -> None:
    config = write_config(tmp_path, relay.port)
    daemon = Daemon(config).start()
    try:
        held = smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30)  # a connection across the reloads
        held.ehlo("held.example")
        new_staff = "third@staff.example"
        config.write_text(config.read_text().replace(f'staff = ["{STAFF}", "{STAFF2}"]',
                                                     f'staff = ["{STAFF}", "{STAFF2}", "{new_staff}"]'))
        set_keys(config, "smtp", max_recipients=7)  # needs a restart: reported, not applied
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.log.read_text().count("reloaded ") == 2, what="both processes reloaded")
        assert "needs_restart=smtp" in daemon.log.read_text()
        send(daemon.smtp_port, "a@customer.example", [CARE], customer_mail("After reload", "one"))
        wait_for(lambda: relay.to(new_staff), what="forward to the added staff address")
        config.write_text(config.read_text().replace("[relay]\n", "[relay]\nretry_delay = [1]\n"))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_refused key=relay.retry_delay" in daemon.log.read_text(), what="refused reload")
        send(daemon.smtp_port, "b@customer.example", [CARE], customer_mail("After refused reload", "two"))
        wait_for(lambda: len(relay.to(new_staff)) == 2, what="second forward, staff list still the reloaded one")
        assert held.noop()[0] == 250
        held.quit()
    finally:
        assert daemon.stop() == 0


def test_notify_socket_hears_ready_reloading_watchdog_and_stopping(tmp_path: Path, relay: CaptureRelay) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(30)
    daemon = Daemon(write_config(tmp_path, relay.port),
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"})
    log = daemon.log.open("ab")
    daemon.proc = subprocess.Popen([sys.executable, "-m", "careservice", "run", "--config", str(daemon.config)],
                                   stdout=log, stderr=log, env={**os.environ, **daemon.env})
    log.close()
    try:
        first = listener.recv(4096).decode()
        assert "READY=1" in first
        socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=1).close()  # accepting by then
        messages = [listener.recv(4096).decode() for _ in range(3)]
        assert all(m == "WATCHDOG=1" for m in messages), messages
        worker = int(subprocess.run(["pgrep", "-P", str(daemon.proc.pid)], capture_output=True,
                                    text=True).stdout.split()[0])
        os.kill(worker, signal.SIGSTOP)  # an unhealthy worker: the pings stop
        try:
            time.sleep(4)
            _drain(listener)
            listener.settimeout(2)
            try:
                quiet = listener.recv(4096).decode()
            except TimeoutError:
                quiet = ""
            assert quiet == "", quiet
        finally:
            os.kill(worker, signal.SIGCONT)
        listener.settimeout(30)
        daemon.proc.send_signal(signal.SIGHUP)
        seen = _until(listener, "READY=1")
        assert any(m.startswith("RELOADING=1") for m in seen), seen
        daemon.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _until(listener, "STOPPING=1")
        assert daemon.proc.wait(STOP_TIMEOUT + 30) == 0
        daemon.proc = None
    finally:
        daemon.stop()
        listener.close()


def _drain(listener: socket.socket) -> None:
    listener.setblocking(False)
    try:
        while True:
            listener.recv(4096)
    except BlockingIOError:
        pass
    finally:
        listener.setblocking(True)


def _until(listener: socket.socket, wanted: str) -> list[str]:
    """Messages up to and including the first that holds `wanted` (WATCHDOG pings between included)."""
    seen: list[str] = []
    for _ in range(100):
        seen.append(listener.recv(4096).decode())
        if wanted in seen[-1]:
            return seen
    raise AssertionError(f"no {wanted} in {seen}")
