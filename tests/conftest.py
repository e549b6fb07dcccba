"""Loopback fixtures: a capture relay, a per-test config, the daemon as a real process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import capture_relay
from tests.support import write_config

pytest_plugins = ["tests.conftest_dovecot", "tests.conftest_rspamd", "tests.conftest_postgres"]


@pytest.fixture
def relay() -> Iterator[CaptureRelay]:
    yield from capture_relay()


@pytest.fixture
def config(tmp_path: Path, relay: CaptureRelay) -> Path:
    return write_config(tmp_path, relay.port)


@pytest.fixture
def daemon(config: Path) -> Iterator[Daemon]:
    proc = Daemon(config).start()
    try:
        yield proc
    finally:
        proc.stop()
