"""The contact form as the tests reach it: HTTP on loopback, a valid submission, and a daemon behind the
test's proxy, serving the form."""

from __future__ import annotations

import html
import http.client
import itertools
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from careservice.crypto import Keyring
from careservice.crypto import load_master_key
from careservice.intake.formguard import CodeTokens
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import wait_for
from tests.support import write_config

CUSTOMER = "zoe@customer.example"
CLIENTS = itertools.count(1)
VALID = {
    "name": "Zoë Müller", "email": CUSTOMER, "query": "Where are my tickets?\nOrder 4711, please help.",
    "company": "Ätna Events GmbH", "address": "Hauptstraße 1\n10115 Berlin", "telephone": "+49 30 123456",
    "fax": "+49 30 123457", "preferred_contact": "telephone",
}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def field_error(self, name: str) -> str:
        """The error message shown for field `name` ("" if none), after checking it is tied to the field."""
        m = re.search(rf'<p class="error" id="{name}-error">([^<]*)</p>', self.text)
        if not m:
            return ""
        tag = re.search(rf'<(?:input|textarea)[^>]* id="{name}"[^>]*>', self.text)
        assert tag and 'aria-invalid="true"' in tag.group(0), f"{name}: error not tied to the field"
        assert re.search(rf'aria-describedby="[^"]*{name}-error', tag.group(0)), f"{name}: no aria-describedby"
        return html.unescape(m.group(1))

    def token(self) -> str:
        m = re.search(r'name="code_token" value="([^"]+)"', self.text)
        assert m, "no verification token in the page"
        return m.group(1)


def call(port: int, method: str, path: str, fields: dict[str, str] | None = None,
         headers: dict[str, str] | None = None, body: bytes | None = None) -> Reply:
    """One HTTP request on loopback (a new connection, no redirects followed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        sent = dict(headers or {})
        if fields is not None:
            body = urlencode(fields).encode()
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)
    finally:
        conn.close()


def behind_proxy(config: Path) -> Path:
    """`config` with the test's own 127.0.0.1 as the trusted reverse proxy, so X-Forwarded-For names the client."""
    text = config.read_text()
    config.write_text(text.replace("[web]\n", '[web]\ntrusted_proxies = ["127.0.0.1"]\n', 1))
    return config


def post(daemon: Daemon, fields: dict[str, str], site: str = "ticketnest", client: str | None = None) -> Reply:
    """POST the form as `client` (named through the proxy header of a behind_proxy config; by default a new
    client, a /64 of its own, each time, so tests stay under the per-IP limit; "" = the test's own 127.0.0.1)."""
    client = f"2001:db8:{next(CLIENTS):x}::1" if client is None else client
    return call(daemon.web_port, "POST", f"/{site}/contact", fields, {"X-Forwarded-For": client} if client else {})


def committed(daemon: Daemon) -> int:
    """Form submissions the daemon stored (de-duplicated ones not counted)."""
    return len(re.findall(r"inbound_committed source=web cases=[0-9a-f]{12}\b", daemon.log.read_text()))


def serving(daemon: Daemon) -> Daemon:
    """`daemon` once its web port accepts connections (it opens just after the SMTP port)."""
    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", daemon.web_port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(accepting, what="web port")
    return daemon


def keeping_nothing(tmp: Path, extra: str = "") -> Iterator[Daemon]:
    """A daemon behind the test proxy for tests that send only what it must refuse: once they are done,
    it has stored and sent nothing."""
    relay = CaptureRelay().start()
    daemon = serving(Daemon(behind_proxy(write_config(tmp, relay.port, extra=extra))).start())
    try:
        yield daemon
    finally:
        daemon.stop()
        relay.stop()
    assert relay.received == [] and committed(daemon) == 0


def start(tmp: Path, relay: CaptureRelay, old: str, new: str) -> Daemon:
    """The daemon with the test config, `old` replaced by `new` in it."""
    config = behind_proxy(write_config(tmp, relay.port))
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))
    return serving(Daemon(config).start())


def tokens(daemon: Daemon, clock: float = 0.0) -> CodeTokens:
    """The daemon's code sealing, from the master key beside its config (a test can read codes; a client cannot)."""
    keyring = Keyring(load_master_key(daemon.config.parent / "master.key", create=False))
    return CodeTokens(keyring.form_code_key(), 900, lambda: clock or time.time())
