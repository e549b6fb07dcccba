"""Real parts for tests: a capture SMTP relay, the daemon as a subprocess, config files, senders."""

from __future__ import annotations

import base64
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from email import message_from_bytes
from email import policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller

from tests.dovecot import DovecotServer

HEX = re.compile(r"[0-9a-fA-F]+")

WAIT = 20.0


def free_port() -> int:
    """A bindable port below the kernel's ephemeral range, so no outgoing connection takes it meanwhile."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def free_ports(count: int) -> list[int]:
    """`count` different free ports: free_port() draws at random, and two listeners of one daemon must not
    draw the same one (it would refuse to start)."""
    ports: set[int] = set()
    for _ in range(100):
        ports.add(free_port())
        if len(ports) == count:
            return sorted(ports)
    raise RuntimeError(f"no {count} different free ports")


def wait_for(predicate: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.raw, policy=policy.default)  # type: ignore[return-value]


@dataclass
class CaptureRelay:
    """A real SMTP server on 127.0.0.1 that keeps what it accepts; `replies` scripts refusals."""

    port: int = field(default_factory=free_port)
    received: list[Captured] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)  # popped per DATA: e.g. "451 4.3.0 later"
    options: dict[str, object] = field(default_factory=dict)  # aiosmtpd SMTP options, e.g. auth_required=True
    attempts: int = 0
    _controller: Controller | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        with self._lock:
            self.attempts += 1
            if self.replies:
                return self.replies.pop(0)
            sender = "" if envelope.mail_from == "<>" else envelope.mail_from  # type: ignore[attr-defined]
            self.received.append(Captured(sender, list(envelope.rcpt_tos),  # type: ignore[attr-defined]
                                          envelope.original_content))  # type: ignore[attr-defined]
        return "250 2.0.0 captured"

    def start(self) -> CaptureRelay:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **self.options)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def to(self, address: str) -> list[Captured]:
        with self._lock:
            return [c for c in self.received if address in c.rcpt_tos]


STAFF = "agent@staff.example"
STAFF2 = "second@staff.example"
CARE = "care@ticketnest.test"


SITES = f"""
[[sites]]
id = "ticketnest"
name = "TicketNest"
domain = "ticketnest.test"
care_address = "{CARE}"
staff = ["{STAFF}", "{STAFF2}"]
[[sites]]
id = "ixs"
name = "ixs"
domain = "ixs.test"
care_address = "care@ixs.test"
staff = ["{STAFF}"]
"""


def with_routes(routes: str) -> str:
    """The test sites (SITES) with `routes`, `[[sites.routes]]` tables, added to the first site."""
    staff = f'staff = ["{STAFF}", "{STAFF2}"]\n'
    return SITES.replace(staff, staff + routes, 1)


def write_config(tmp: Path, relay_port: int, *, extra: str = "", relay_url: str = "",
                 retry_delays: str = "[1, 1, 2]", give_up_after: int = 432000, sites: str = SITES) -> Path:
    """A config for one test: its own data dir, free ports, a relay on loopback; `sites` replaces the two test sites."""
    tmp.mkdir(parents=True, exist_ok=True)
    smtp_port, web_port, admin_port = free_ports(3)
    (tmp / "config.toml").write_text(f"""
[service]
data_dir = "data"
log_level = "DEBUG"
[security]
master_key_file = "master.key"
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "care.test"
max_message_bytes = 200000
min_free_bytes = 1
[relay]
url = "{relay_url or f'smtp://127.0.0.1:{relay_port}'}"
retry_delays = {retry_delays}
give_up_after = {give_up_after}
timeout = 10
[web]
listen = "127.0.0.1:{web_port}"
verification = "off"
[admin]
listen = "127.0.0.1:{admin_port}"
{sites}
{extra}
""")
    return tmp / "config.toml"


def imap_config(tmp: Path, relay: CaptureRelay, dovecot: DovecotServer, *, password: str = "", poll_seconds: int = 60,
                security: str = "none", auth: str = "") -> Path:
    """A daemon config with one [[imap]] table for the test Dovecot; the password goes to a file, unless
    `auth` gives the table's auth lines instead."""
    tmp.mkdir(parents=True, exist_ok=True)
    secret = tmp / "imap.password"
    secret.write_text((password or dovecot.password) + "\n")
    return write_config(tmp, relay.port, extra=f"""
[[imap]]
site = "ticketnest"
host = "{dovecot.host}"
port = {dovecot.port}
security = "{security}"
username = "{dovecot.username}"
{auth or f'password_file = "{secret}"'}
poll_seconds = {poll_seconds}
""")


def capture_relay() -> Iterator[CaptureRelay]:
    """A CaptureRelay for the length of a fixture."""
    server = CaptureRelay().start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Daemon:
    """`careservice run` as a real process; its stderr goes to `log`."""

    config: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    module: str = "careservice"  # what `python -m` runs: a test may wrap the CLI (tests/imapcrash.py)

    @property
    def log(self) -> Path:
        return self.config.parent / "daemon.log"

    @property
    def data_dir(self) -> Path:
        return self.config.parent / "data"

    @property
    def smtp_port(self) -> int:
        text = self.config.read_text()
        return int(text.split("[smtp]")[1].split("listen = ")[1].split('"')[1].rsplit(":", 1)[1])

    @property
    def web_port(self) -> int:
        return self._port("web")

    @property
    def admin_port(self) -> int:
        return self._port("admin")

    def _port(self, table: str) -> int:
        text = self.config.read_text()
        return int(text.split(f"[{table}]")[1].split("listen = ")[1].split('"')[1].rsplit(":", 1)[1])

    def start(self) -> Daemon:
        env = {**os.environ, **self.env}
        with self.log.open("ab") as log:
            since = log.tell()  # a restart appends to the same log
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "run", "--config", str(self.config)],
                stdout=log, stderr=log, env=env, cwd=self.config.parent,
            )
        # the SMTP port opens before the web and admin servers: a test that then moves data_dir or
        # stops something must not race the rest of the start
        wait_for(lambda: self._listening() and b"careservice running:" in self.log.read_bytes()[since:],
                 what="daemon started")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.smtp_port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self.proc = None
        return code

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def status(self) -> dict[str, int]:
        import json

        out = subprocess.run([sys.executable, "-m", "careservice", "status", "--json", "--config", str(self.config)],
                             capture_output=True, check=True, timeout=30)
        return json.loads(out.stdout)


def customer_mail(subject: str, body: str, sender: str = "alice@customer.example", name: str = "Alice Example",
                  message_id: str = "", headers: dict[str, str] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"{name} <{sender}>"
    msg["To"] = CARE
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or f"<{base64.b32encode(os.urandom(10)).decode().lower()}@customer.example>"
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(body)
    return msg.as_bytes(policy=policy.SMTP)


def send(port: int, sender: str, recipients: list[str], raw: bytes) -> None:
    """Send one message over SMTP on loopback; raises on any refusal."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, recipients, raw)


def staff_reply(forward: EmailMessage, text: str, sender: str = STAFF, to: str = "") -> bytes:
    """What a staff mail client sends on Reply: new text above a quote of the forward."""
    quoted = "\n".join("> " + line for line in forward.get_body(("plain",)).get_content().splitlines())
    msg = EmailMessage()
    msg["From"] = f"Agent Smith <{sender}>"
    msg["To"] = to or str(forward["Reply-To"])
    msg["Subject"] = "Re: " + str(forward["Subject"])
    msg["In-Reply-To"] = str(forward["Message-ID"])
    msg["Message-ID"] = f"<{base64.b32encode(os.urandom(10)).decode().lower()}@staff.example>"
    msg.set_content(f"{text}\n\nOn Monday, {forward['From']} wrote:\n{quoted}\n")
    return msg.as_bytes(policy=policy.SMTP)


def holds(text: str | bytes, marker: str) -> bool:
    """Whether `text` holds `marker`. A marker of hex digits only (an order number) counts only as a word of
    its own: case ids, Message-IDs and MIME boundaries are random hex and hold such a marker by chance
    ("4711" in case id 447118538e18)."""
    found = text.decode("latin-1") if isinstance(text, bytes) else text
    if HEX.fullmatch(marker):
        return re.search(rf"(?<![0-9a-fA-F]){marker}(?![0-9a-fA-F])", found) is not None
    return marker in found


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under `root` that holds one of `needles` (raw bytes, also after base64)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                if needle in data or base64.b64encode(needle) in data:
                    found.append(f"{path}: {needle!r}")
    return found
