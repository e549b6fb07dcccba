"""careservice.notify against real datagram sockets: a path in a temp dir and the abstract namespace."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from careservice.notify import Notifier


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify")
    sock.bind(address)
    sock.settimeout(5)
    with sock:
        yield sock, address


def received(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(4096) for _ in range(count)]


def test_messages_arrive_exactly_on_a_path_socket(clean_env: pytest.MonkeyPatch,
                                                  path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    clean_env.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_env()
    notifier.ready()
    notifier.watchdog()
    notifier.status("open 3\nqueued 1")
    notifier.stopping()
    assert received(sock, 4) == [b"READY=1", b"WATCHDOG=1", b"STATUS=open 3 queued 1", b"STOPPING=1"]


def test_reloading_carries_the_monotonic_clock(clean_env: pytest.MonkeyPatch,
                                               path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    clean_env.setenv("NOTIFY_SOCKET", address)
    before = time.monotonic_ns() // 1000
    Notifier.from_env().reloading()
    after = time.monotonic_ns() // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_namespace_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"careservice-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier.from_env()
        notifier.ready()
        notifier.stopping()
        assert received(sock, 2) == [b"READY=1", b"STOPPING=1"]


def test_unset_socket_is_a_no_op(clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_env()
    assert notifier.address is None
    notifier.ready()
    notifier.reloading()
    notifier.watchdog()
    notifier.status("x")
    notifier.stopping()
    assert notifier.watchdog_interval() is None
    assert not caplog.records


def test_send_failure_is_logged_once_and_not_raised(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = Notifier.from_env()
    with caplog.at_level(logging.WARNING, logger="careservice.notify"):
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    assert [r.getMessage().split()[0] for r in caplog.records] == ["notify_failed"]


def test_failure_log_rearms_after_a_success(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    address = str(tmp_path / "notify")
    clean_env.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_env()
    with caplog.at_level(logging.WARNING, logger="careservice.notify"):
        notifier.watchdog()  # nothing bound yet: fails, logged
        notifier.watchdog()  # still failing: not logged again
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            notifier.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
        os.unlink(address)
        notifier.watchdog()  # failing again: a new streak, logged again
    assert [r.getMessage().split()[0] for r in caplog.records] == ["notify_failed", "notify_failed"]


def test_watchdog_interval_is_half_the_timeout(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "4000000")
    assert Notifier.from_env().watchdog_interval() == 2.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_env().watchdog_interval() == 2.0


@pytest.mark.parametrize("usec, pid", [("4000000", "1"), ("", None), ("0", None), ("soon", None)])
def test_no_watchdog_for_another_process_or_a_bad_value(clean_env: pytest.MonkeyPatch, usec: str,
                                                        pid: str | None) -> None:
    """A worker child inherits WATCHDOG_USEC, but WATCHDOG_PID still names its parent."""
    clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_env.setenv("WATCHDOG_PID", pid)
    assert Notifier.from_env().watchdog_interval() is None
