"""Abuse of the contact form by one client must not take it away from everyone: half-sent requests
are closed after web.header_timeout and one address holds at most web.max_connections_per_client;
a client cannot choose its rate-limit bucket through X-Forwarded-For; posts and spoken codes of all
clients together are capped, the latter measured against SMTP latency in the same process. Real
daemon, real sockets on loopback (127.0.0.2 and up as the source address of other clients)."""

from __future__ import annotations

import http.client
import math
import random
import selectors
import smtplib
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from careservice.config import ConfigError
from careservice.config import load_config
from tests.reliability.helpers import SCALE
from tests.reliability.helpers import set_keys
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import write_config
from tests.webclient import VALID
from tests.webclient import Reply
from tests.webclient import call
from tests.webclient import serving

pytestmark = pytest.mark.reliability

INVALID = {**VALID, "name": ""}  # counted by the limits like any post, refused (400) before anything is stored
HALF_OPEN = 520  # above uvicorn's limit_concurrency (500): this many took the page away from everyone
HEADER_TIMEOUT = 5
SLACK = 15.0  # a loaded test machine's delay on top of a deadline: a hang detector, not a timing bound
HALF_REQUEST = b"GET /ticketnest/contact HTTP/1.1\r\nHost: care.test\r\nX-Slow: "


def web_daemon(tmp: Path, relay: CaptureRelay, **web: object) -> Daemon:
    """The daemon with these [web] keys set, once its web port accepts."""
    return serving(Daemon(set_keys(write_config(tmp, relay.port), "web", **web)).start())


def post_via(daemon: Daemon, forwarded: str) -> int:
    """The status of one (invalid) post from the test's own 127.0.0.1 carrying this X-Forwarded-For."""
    return call(daemon.web_port, "POST", "/ticketnest/contact", INVALID, {"X-Forwarded-For": forwarded}).status


def random_address() -> str:
    return f"198.51.{random.randrange(256)}.{random.randrange(1, 255)}"


def connect(daemon: Daemon, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.web_port), timeout=30, source_address=(source, 0))


def get_page(daemon: Daemon, source: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.web_port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", "/ticketnest/contact")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def read_response(sock: socket.socket) -> bytes:
    """One whole response (with a Content-Length) from a raw socket: its status line."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return lines[0]


def endings(socks: list[socket.socket], seconds: float) -> list[tuple[bytes, float | None]]:
    """For each socket: the status line the server sent (b"" if none) and when (time.monotonic()) it
    closed the connection, None if still open after `seconds`; all sockets are closed afterwards."""
    received = {s: b"" for s in socks}
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        for s in socks:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    chunk = s.recv(65536)
                except ConnectionError:
                    chunk = b""
                received[s] += chunk
                if not chunk:
                    closed[s] = time.monotonic()
                    selector.unregister(s)
    for s in socks:
        s.close()
    return [(received[s].split(b"\r\n", 1)[0], closed.get(s)) for s in socks]


def test_half_sent_requests_from_one_client_leave_the_page_to_others(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = web_daemon(tmp_path, relay, header_timeout=HEADER_TIMEOUT)
    try:
        started = time.monotonic()
        attack = []
        for _ in range(HALF_OPEN):
            sock = connect(daemon, "127.0.0.3")
            sock.sendall(HALF_REQUEST)
            attack.append(sock)
        others = Counter(get_page(daemon, "127.0.0.2") for _ in range(5 * SCALE))
        probed = time.monotonic() - started
        ends = endings(attack, HEADER_TIMEOUT + SLACK)
        lines = Counter(line for line, _ in ends)
        held = [at - started for line, at in ends if line.startswith(b"HTTP/1.1 408") and at is not None]
        print(f"{HALF_OPEN} half-sent requests from one address: other client's GETs {dict(others)} within "
              f"{probed:.2f} s; attacker got {dict(lines)}; still open {sum(at is None for _, at in ends)}; "
              f"held {min(held, default=0):.2f}-{max(held, default=0):.2f} s (header_timeout {HEADER_TIMEOUT})")
        assert others == {200: 5 * SCALE}
        assert lines == {b"HTTP/1.1 408 Request Timeout": 20, b"HTTP/1.1 429 Too Many Requests": HALF_OPEN - 20}
        assert all(at is not None for _, at in ends)
        assert min(held) >= HEADER_TIMEOUT - 0.5  # the deadline, not the cap, ended the admitted ones
        assert get_page(daemon, "127.0.0.3") == 200  # their slots are free again
    finally:
        daemon.stop()


def test_a_kept_alive_connection_gets_the_same_deadline(tmp_path: Path, relay: CaptureRelay) -> None:
    """After one answer, half of the next request; or the body of an answered request, trickled."""
    daemon = web_daemon(tmp_path, relay, header_timeout=HEADER_TIMEOUT)
    try:
        half_next = connect(daemon, "127.0.0.4")
        half_next.sendall(b"GET /ticketnest/contact HTTP/1.1\r\nHost: care.test\r\n\r\n")
        assert read_response(half_next) == b"HTTP/1.1 200 OK"
        half_next.sendall(HALF_REQUEST)
        trickle = connect(daemon, "127.0.0.5")
        trickle.sendall(b"POST /ticketnest/contact HTTP/1.1\r\nHost: care.test\r\nContent-Length: 1000000000\r\n"
                        b"Content-Type: application/x-www-form-urlencoded\r\n\r\nname=")
        assert read_response(trickle) == b"HTTP/1.1 413 Request Entity Too Large"
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT + SLACK:
            try:
                trickle.sendall(b"x")  # faster than uvicorn's keep-alive timeout (5 s), which each byte restarts
            except OSError:
                break
            time.sleep(0.5)
        ends = endings([half_next], SLACK) + endings([trickle], SLACK)
        print("kept alive, closed after (s):", [(line, at and round(at - started, 2)) for line, at in ends])
        assert ends[0][0] == b"HTTP/1.1 408 Request Timeout"
        assert ends[1][0] in (b"HTTP/1.1 408 Request Timeout", b"")  # or reset: the server left bytes unread
        assert all(at is not None and at - started < HEADER_TIMEOUT + SLACK for _, at in ends)
    finally:
        daemon.stop()


def test_forwarded_for_is_ignored_without_trusted_proxies(tmp_path: Path, relay: CaptureRelay) -> None:
    """The attack: a new made-up X-Forwarded-For on every post, straight to the daemon."""
    daemon = web_daemon(tmp_path, relay)  # web.trusted_proxies at its default: none
    try:
        answers = Counter(post_via(daemon, random_address()) for _ in range(25))
        print(f"25 posts with a random X-Forwarded-For against a limit of 20: {dict(answers)}")
        assert answers == {400: 20, 429: 5}
    finally:
        daemon.stop()


def test_only_the_address_the_trusted_proxy_added_counts(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = web_daemon(tmp_path, relay, trusted_proxies=["127.0.0.1"], max_posts_per_ip_per_hour=3,
                        max_connections_per_client=2)
    held = []
    try:
        for _ in range(4):  # the proxy carries every customer's connections: the per-address cap spares it
            held.append(connect(daemon, "127.0.0.1"))
            held[-1].sendall(HALF_REQUEST)
        # a proxy that appends ($proxy_add_x_forwarded_for) keeps what the client sent on the left
        answers = Counter(post_via(daemon, f"{random_address()}, 203.0.113.5") for _ in range(5))
        print(f"5 posts, client-chosen left entries, proxy-added 203.0.113.5, limit 3: {dict(answers)}")
        assert answers == {400: 3, 429: 2}
        assert post_via(daemon, "203.0.113.5, 203.0.113.6") == 400  # the right-most entry is the client
        assert post_via(daemon, "203.0.113.6") == 400
        v6 = Counter(post_via(daemon, f"2001:db8:77:1::{i:x}") for i in range(1, 5))
        assert v6 == {400: 3, 429: 1}, v6  # one /64 is one client
        assert post_via(daemon, "2001:db8:77:2::1") == 400
        assert b"203.0.113" not in daemon.log.read_bytes() and b"2001:db8" not in daemon.log.read_bytes()
        for _ in range(3):
            held.append(connect(daemon, "127.0.0.6"))
        assert [line for line, _ in endings(held[-3:], 2)] == [b"", b"", b"HTTP/1.1 429 Too Many Requests"]
    finally:
        for sock in held:
            sock.close()
        daemon.stop()


def test_posts_of_all_clients_together_are_capped(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = web_daemon(tmp_path, relay, trusted_proxies=["127.0.0.1"], max_posts_per_ip_per_hour=3,
                        max_posts_per_minute=10)
    try:
        one = Counter(post_via(daemon, "203.0.113.1") for _ in range(15))
        assert one == {400: 3, 429: 12}  # one client's refused posts use up nothing of the common budget
        many = [call(daemon.web_port, "POST", "/ticketnest/contact", INVALID, {"X-Forwarded-For": f"2001:db8:{i:x}::1"})
                for i in range(1, 1 + 10 * SCALE)]
        answers = Counter(reply.status for reply in many)
        print(f"{len(many)} more clients, one post each, 10 posts a minute in all: {dict(answers)}")
        assert answers == {400: 7, 429: len(many) - 7}
        refused = next(reply for reply in many if reply.status == 429)
        assert "Please try again later" in refused.text and 0 < int(refused.headers["retry-after"]) <= 60
        log = daemon.log.read_text()
        assert log.count("reason=rate_limited") == 12 and log.count("reason=busy") == len(many) - 7
    finally:
        daemon.stop()


@pytest.mark.parametrize(("key", "value", "named"), [
    ("header_timeout", 0, "web.header_timeout"),
    ("max_connections_per_client", "20", "web.max_connections_per_client"),
    ("max_posts_per_minute", -1, "web.max_posts_per_minute"),
    ("max_audio_codes_per_minute", 1.5, "web.max_audio_codes_per_minute"),
    ("trusted_proxies", "127.0.0.1", "web.trusted_proxies"),
    ("trusted_proxies", ["127.0.0.1", "proxy.example"], "web.trusted_proxies[1]"),
    ("trusted_proxies", ["10.0.0.1/8"], "web.trusted_proxies[0]"),
    ("trusted_proxies", [5], "web.trusted_proxies[0]"),
])
def test_config_errors_name_the_key(tmp_path: Path, key: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(set_keys(write_config(tmp_path, 1), "web", **{key: value}))
    assert error.value.key == named


def code_token(daemon: Daemon) -> str:
    return call(daemon.web_port, "GET", "/ticketnest/contact").token()


def fetch_code(daemon: Daemon, token: str, kind: str, forwarded: str) -> Reply:
    return call(daemon.web_port, "GET", f"/ticketnest/contact/code.{kind}?t={token}",
                headers={"X-Forwarded-For": forwarded})


def test_code_renders_are_capped_per_client_and_for_all(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = web_daemon(tmp_path, relay, verification="image", trusted_proxies=["127.0.0.1"],
                        max_posts_per_ip_per_hour=1, max_audio_codes_per_minute=4)
    try:
        token = code_token(daemon)
        one = [fetch_code(daemon, token, "png", "203.0.113.1") for _ in range(7)]
        assert [r.status for r in one] == [200] * 5 + [429] * 2  # 5 an hour per permitted post
        assert 0 < int(one[-1].headers["retry-after"]) <= 3600
        spoken = Counter(fetch_code(daemon, token, "wav", f"203.0.113.{i}").status for i in range(2, 12))
        assert spoken == {200: 4, 429: 6}
        assert fetch_code(daemon, token, "png", "203.0.113.20").status == 200  # the image is not the costly one
    finally:
        daemon.stop()


def smtp_latencies(daemon: Daemon, seconds: float) -> list[float]:
    """Seconds each NOOP took on one SMTP session of the same daemon, one every 5 ms for `seconds`."""
    took = []
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
        client.ehlo()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            assert client.noop()[0] == 250
            took.append(time.perf_counter() - started)
            time.sleep(0.005)
    return took


def percentiles(took: list[float]) -> str:
    ordered = sorted(took)
    return " ".join(f"p{q}={ordered[min(len(ordered) - 1, len(ordered) * q // 100)] * 1000:.1f}ms" for q in (50, 99))


def audio_flood(daemon: Daemon, seconds: float) -> tuple[Counter[int], str]:
    """code.wav (about 0.3 s of CPU each) asked for by three threads, each every 0.1 s or when its last
    answer came, with a new made-up X-Forwarded-For each time, while a mail client sends NOOPs to the
    same process: the answers, and the NOOP latencies before and during the flood."""
    token = code_token(daemon)
    quiet = smtp_latencies(daemon, 2)
    answers: list[int] = []
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            answers.append(fetch_code(daemon, token, "wav", random_address()).status)
            stop.wait(0.1)

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    for thread in attackers:
        thread.start()
    try:
        flooded = smtp_latencies(daemon, seconds)
    finally:
        stop.set()
        for thread in attackers:
            thread.join()
    return Counter(answers), f"SMTP NOOP quiet {percentiles(quiet)}, during the flood {percentiles(flooded)}"


def test_spoken_codes_for_one_client_stop_early(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = web_daemon(tmp_path, relay, verification="image")  # no trusted proxies: one client
    try:
        answers, latencies = audio_flood(daemon, 5 * SCALE)
        print(f"code.wav flood from one client for {5 * SCALE} s: {dict(answers)}; {latencies}")
        assert answers[200] <= 5 * math.ceil(5 * SCALE / 60)  # 5 a minute per client
        assert answers[429] == answers.total() - answers[200]
    finally:
        daemon.stop()


def test_spoken_codes_for_all_clients_stop_at_the_cap(tmp_path: Path, relay: CaptureRelay) -> None:
    """The flood again, each request from another client through the trusted proxy: the drawing thread
    runs without a pause until the audio cap is reached."""
    daemon = web_daemon(tmp_path, relay, verification="image", trusted_proxies=["127.0.0.1"],
                        max_audio_codes_per_minute=10)
    try:
        answers, latencies = audio_flood(daemon, 8 * SCALE)
        print(f"code.wav flood from many clients for {8 * SCALE} s, 10 a minute: {dict(answers)}; {latencies}")
        assert answers[200] <= 10 * math.ceil(8 * SCALE / 60)
        assert answers[429] == answers.total() - answers[200]
    finally:
        daemon.stop()
