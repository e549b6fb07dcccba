"""The rspamd client in-process: rspamd's answers as verdicts, its wire protocol, no answer, the header, the config."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from pathlib import Path

import pytest
from aiosmtpd.smtp import Session

from careservice.config import ConfigError
from careservice.config import load_config
from careservice.intake.spamcheck import FORM_USER
from careservice.intake.spamcheck import Probe
from careservice.intake.spamcheck import SpamCheck
from careservice.intake.spamcheck import form_message
from careservice.intake.spamcheck import form_probe
from careservice.model import ContactDetails
from careservice.settings import SpamConfig
from careservice.spamverdict import SKIPPED
from careservice.spamverdict import SpamVerdict
from careservice.spamverdict import read
from careservice.spamverdict import stamp
from tests.rspamd import ADD_HEADER
from tests.rspamd import GREYLIST
from tests.rspamd import GTUBE
from tests.rspamd import SOFT_REJECT
from tests.rspamd import SPF_PASS_IP
from tests.rspamd import RspamdServer
from tests.support import CARE
from tests.support import write_config
from tests.test_check import cli
from tests.test_check import with_lines

ALICE = "alice@customer.example"


def spam_table(url: str, timeout: int = 5) -> str:
    return f'[spam]\nrspamd_url = "{url}"\ntimeout = {timeout}\n'


def mail(domain: str, body: bytes, received_from: str = "") -> bytes:
    """A message from alice@`domain`; with `received_from`, as an MX that took it from that address left it."""
    trace = (f"Return-Path: <alice@{domain}>\r\nReceived: from mail.{domain} (mail.{domain} [{received_from}])\r\n"
             f"\tby mx.ticketnest.test with ESMTPS id 4AB12; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
             if received_from else "")
    return (f"{trace}From: Alice <alice@{domain}>\r\nTo: {CARE}\r\nSubject: Tickets\r\n"
            f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <1@{domain}>\r\n\r\n").encode() + body + b"\r\n"


# --- rspamd's answers as the service reads them (in-process, real rspamd) ---


@pytest.mark.parametrize(("raw", "probe", "expected"), [
    (mail("spf-pass.test", b"Hello, notes attached."), Probe((CARE,), "alice@spf-pass.test", SPF_PASS_IP,
                                                             "mail.spf-pass.test", "mail.spf-pass.test"),
     SpamVerdict("ham", "pass", "pass")),
    (mail("spf-pass.test", b"Hello, notes attached."), Probe((CARE,), "alice@spf-pass.test", "198.51.100.7",
                                                             "mail.example.net", "mail.example.net"),
     SpamVerdict("suspect", "fail", "fail")),  # add header (7.5) for the SPF and DMARC failure
    (mail("nospf.test", b"Hello, notes attached."), Probe((CARE,), "alice@nospf.test", SPF_PASS_IP),
     SpamVerdict("ham", "none", "none")),
    (mail("spf-pass.test", b"Hello", received_from=SPF_PASS_IP), Probe((CARE,)), SpamVerdict("ham", "pass", "pass")),
    (mail("spf-pass.test", b"Hello", received_from="198.51.100.7"), Probe((CARE,)),
     SpamVerdict("greylist", "fail", "fail")),  # a lower score than over SMTP: no direct SPF violation
    (mail("spf-pass.test", GTUBE), Probe((CARE,), "alice@spf-pass.test", SPF_PASS_IP), SpamVerdict("reject")),
    (mail("spf-pass.test", b"Hi " + ADD_HEADER), Probe((CARE,), "", SPF_PASS_IP), SpamVerdict("suspect")),
    (mail("spf-pass.test", b"Hi " + GREYLIST), Probe((CARE,), "", SPF_PASS_IP), SpamVerdict("greylist")),
    (mail("spf-pass.test", b"Hi " + SOFT_REJECT), Probe((CARE,), "", SPF_PASS_IP), SpamVerdict("greylist")),
], ids=["spf-dmarc-pass", "spf-dmarc-fail", "no-records", "imap-pass", "imap-fail", "gtube", "add-header",
        "greylist", "soft-reject"])
async def test_rspamd_actions_and_sender_checks_become_verdicts(rspamd: RspamdServer, raw: bytes, probe: Probe,
                                                                expected: SpamVerdict) -> None:
    check = SpamCheck(SpamConfig(rspamd.url, 5))
    try:
        assert await check.check(raw, probe) == expected
    finally:
        await check.close()


async def test_a_form_post_is_checked_by_its_fields_without_sender_checks(tmp_path: Path,
                                                                         rspamd: RspamdServer) -> None:
    site = load_config(write_config(tmp_path, 1)).sites[0]
    contact = ContactDetails("Alice", "alice@spf-pass.test", company=GTUBE.decode())  # GTUBE in a field, not the query
    check = SpamCheck(SpamConfig(rspamd.url, 5))
    try:
        assert form_probe(site, contact.email).user == FORM_USER
        assert await check.check(form_message(site, contact, "Where are my tickets?", "Contact form"),
                                 form_probe(site, contact.email)) == SpamVerdict("reject")
        # no address to check SPF against: DMARC p=reject of the customer's domain must not count against the post
        plain = ContactDetails("Alice", "alice@spf-pass.test", company="Events Ltd")
        assert await check.check(form_message(site, plain, "Where are my tickets?", "Contact form"),
                                 form_probe(site, plain.email)) == SpamVerdict("ham")
    finally:
        await check.close()


class _Silent:
    """A loopback TCP server that takes connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


async def _answering(status: bytes, body: bytes) -> asyncio.Server:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(reply, "127.0.0.1", 0)


async def test_an_smtp_check_tells_rspamd_the_envelope_client_helo_and_host_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[bytes] = []
    proxied: list[bool] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxied.append(True)
        writer.close()

    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):  # the mail must go to rspamd alone
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_server.sockets[0].getsockname()[1]}")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        requests.append(head + await reader.readexactly(length))
        body = b'{"action": "no action", "score": 0.3, "symbols": {"R_SPF_ALLOW": {}, "DMARC_POLICY_ALLOW": {}}}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    check = SpamCheck(SpamConfig(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/rspamd/", 5))
    session = Session(asyncio.get_running_loop())
    session.peer, session.host_name = ("127.0.0.1", 40000), "client\x07.example"  # type: ignore[assignment]
    raw = mail("x.test", b"Hello")
    try:
        probe = await check.smtp_probe(session, ALICE, [CARE, "care@ixs.test"])
        assert await check.check(raw, probe) == SpamVerdict("ham", "pass", "pass")
    finally:
        await check.close()
        for listener in (server, proxy_server):
            listener.close()
            await listener.wait_closed()
    assert proxied == []
    [request] = requests
    head, body = request.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /rspamd/checkv2 HTTP/1.1" and body == raw
    assert {"Rcpt: care@ticketnest.test", "Rcpt: care@ixs.test", f"From: {ALICE}", "IP: 127.0.0.1",
            "Helo: client.example", "Hostname: localhost"} <= set(lines)  # localhost: 127.0.0.1's name in /etc/hosts


@pytest.mark.parametrize("kind", ["refused", "silent", "http_500", "not_json"])
async def test_no_verdict_is_unavailable_within_the_timeout_and_logged_once_a_minute(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    silent, server = None, None
    if kind == "refused":
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]  # closed again: nothing listens there
    elif kind == "silent":
        silent = _Silent()
        port = silent.port
    else:
        server = await _answering(b"500 Internal Server Error" if kind == "http_500" else b"200 OK",
                                  b"oops" if kind == "http_500" else b"<html>not rspamd</html>")
        port = server.sockets[0].getsockname()[1]
    now = [1000.0]
    check = SpamCheck(SpamConfig(f"http://127.0.0.1:{port}", 1), clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "careservice.spam")
    try:
        started = time.monotonic()
        verdicts = [await check.check(mail("x.test", b"hi"), Probe((CARE,))) for _ in range(3)]
        assert time.monotonic() - started < 3 * 1 + 2
        now[0] += 60
        verdicts.append(await check.check(mail("x.test", b"hi"), Probe((CARE,))))
    finally:
        await check.close()
        if silent:
            silent.close()
        if server:
            server.close()
            await server.wait_closed()
    assert verdicts == [SpamVerdict("unavailable")] * 4
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spam_check_unavailable")]
    assert [re.sub(r"reason=\S+ ", "", line).split(" (")[0] for line in lines] == [
        "spam_check_unavailable count=1", "spam_check_unavailable count=3"]
    assert all("127.0.0.1" not in line for line in lines)


async def test_no_url_means_no_check() -> None:
    check = SpamCheck(SpamConfig("", 5))
    assert await check.check(mail("x.test", GTUBE), Probe((CARE,))) is SKIPPED
    await check.close()


# --- the header the service writes ---


def test_the_senders_header_is_replaced_by_ours() -> None:
    raw = (b"X-Careservice-Spam: ham; spf=pass;\n dmarc=pass\nFrom: a@b.test\nx-careservice-spam : ham\n"
           b"Subject: hi\n\nX-Careservice-Spam: ham (the body is the customer's)\n")
    body = b"Subject: hi\n\nX-Careservice-Spam: ham (the body is the customer's)\n"
    assert stamp(raw, SpamVerdict("suspect", "fail", "none")) == (
        b"X-Careservice-Spam: suspect; spf=fail; dmarc=none\nFrom: a@b.test\n" + body)
    assert stamp(raw, SKIPPED) == b"From: a@b.test\n" + body
    assert read(stamp(raw, SKIPPED)) is None
    crlf = b"From: a@b.test\r\nSubject: hi\r\n\r\ntext\r\n"
    assert stamp(crlf, SpamVerdict("unavailable")) == b"X-Careservice-Spam: unchecked\r\n" + crlf
    for verdict in (SpamVerdict("ham", "pass", "pass"), SpamVerdict("suspect"), SpamVerdict("unavailable")):
        assert read(stamp(crlf, verdict)) == verdict
    assert read(stamp(crlf, SpamVerdict("greylist", "pass", "none"))) == SpamVerdict("suspect", "pass", "none")


# --- configuration ---


def test_spam_keys_are_read_and_default_to_off(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, 1)).spam == SpamConfig("", 5)
    config = load_config(write_config(tmp_path, 1, extra=spam_table("http://127.0.0.1:11333", 2)))
    assert config.spam == SpamConfig("http://127.0.0.1:11333", 2)
    with pytest.raises(ConfigError) as raised:
        load_config(with_lines(write_config(tmp_path, 1), "spam", 'rspamd = "http://127.0.0.1:11333"'))
    assert raised.value.key == "spam.rspamd"
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, 1, extra=spam_table("http://127.0.0.1:11333", 0)))
    assert raised.value.key == "spam.timeout"


@pytest.mark.parametrize("url", ["127.0.0.1:11333", "ftp://127.0.0.1:11333", "http://127.0.0.1", "http://:11333",
                                 "http://127.0.0.1:port", "http://127.0.0.1:99999", "http://u:p@127.0.0.1:11333",
                                 "http://127.0.0.1:11333/?x=1"])
def test_check_refuses_a_malformed_rspamd_url_naming_the_key(tmp_path: Path, url: str) -> None:
    result = cli("check", "--config", str(write_config(tmp_path, 1, extra=spam_table(url))))
    assert result.returncode == 2
    assert "spam.rspamd_url" in result.stderr and url in result.stderr


def test_check_takes_a_good_rspamd_url(tmp_path: Path) -> None:
    result = cli("check", "--config", str(write_config(tmp_path, 1, extra=spam_table("https://rspamd.internal:443/"))))
    assert result.returncode == 0, result.stderr
    assert "spam       rspamd https://rspamd.internal:443/" in result.stdout
