"""Abuse of the contact form by one client must not take it away from everyone: a client cannot
choose its rate-limit bucket through X-Forwarded-For. Real daemon, real sockets on loopback."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from careservice.config import ConfigError, load_config
from tests.reliability.helpers import set_keys
from tests.support import CaptureRelay, Daemon, write_config
from tests.test_web import VALID, call, serving

pytestmark = pytest.mark.reliability

INVALID = {**VALID, "name": ""}  # counted by the limits like any post, refused (400) before anything is stored


def web_daemon(tmp: Path, relay: CaptureRelay, **web: object) -> Daemon:
    """The daemon with these [web] keys set, once its web port accepts."""
    return serving(Daemon(set_keys(write_config(tmp, relay.port), "web", **web)).start())


def post_via(daemon: Daemon, forwarded: str) -> int:
    """The status of one (invalid) post from the test's own 127.0.0.1 carrying this X-Forwarded-For."""
    return call(daemon.web_port, "POST", "/ticketnest/contact", INVALID, {"X-Forwarded-For": forwarded}).status


def random_address() -> str:
    return f"198.51.{random.randrange(256)}.{random.randrange(1, 255)}"


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
    daemon = web_daemon(tmp_path, relay, trusted_proxies=["127.0.0.1"], max_posts_per_ip_per_hour=3)
    try:
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
    finally:
        daemon.stop()


@pytest.mark.parametrize(("key", "value", "named"), [
    ("trusted_proxies", "127.0.0.1", "web.trusted_proxies"),
    ("trusted_proxies", ["127.0.0.1", "proxy.example"], "web.trusted_proxies[1]"),
    ("trusted_proxies", ["10.0.0.1/8"], "web.trusted_proxies[0]"),
    ("trusted_proxies", [5], "web.trusted_proxies[0]"),
])
def test_config_errors_name_the_key(tmp_path: Path, key: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(set_keys(write_config(tmp_path, 1), "web", **{key: value}))
    assert error.value.key == named
