"""Shared pieces of the reliability suite: run size, config tweaks, raw SMTP, store and log checks."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from careservice.store import read_status
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import holds
from tests.support import write_config

SCALE = max(1, int(os.environ.get("CARESERVICE_RELIABILITY_SCALE", "1")))  # 20 = the full run (>= 200 kills)
IDLE = {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0}


def set_keys(config: Path, section: str, **values: object) -> Path:
    """Set `key = value` lines in one [section] of a config written by tests.support.write_config."""
    text = config.read_text()
    head, rest = text.split(f"[{section}]\n", 1)
    body, sep, tail = rest.partition("\n[")
    lines = [line for line in body.splitlines() if line.split(" = ")[0].strip() not in values]
    lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    config.write_text(head + f"[{section}]\n" + "\n".join(lines) + sep + tail)
    return config


def status(daemon: Daemon) -> dict[str, object]:
    """Case and queue counts read straight from the store (cheaper than `careservice status`)."""
    counts = read_status(daemon.data_dir)
    counts.pop("imap", None)
    return counts


def wal_copied(data_dir: Path) -> bool:
    """Whether every frame in cases.db's WAL is in the database, read from the WAL index (cases.db-shm:
    mxFrame at byte 16, nBackfill at byte 96, native order) without a connection, which would hold a snapshot."""
    shm = (data_dir / "cases.db-shm").read_bytes()[:100]
    frames, copied = struct.unpack_from("=I", shm, 16)[0], struct.unpack_from("=I", shm, 96)[0]
    return frames == copied


def integrity(data_dir: Path) -> list[str]:
    """SQLite's integrity_check for both store files; ["ok", "ok"] when sound."""
    results = []
    for name in ("cases.db", "keys.db"):
        conn = sqlite3.connect(f"file:{data_dir / name}?mode=ro", uri=True, timeout=10)
        try:
            results.append(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()
    return results


def stored_rows(data_dir: Path) -> dict[str, int]:
    """Rows left in the tables that hold case data and keys (all 0 once everything is purged)."""
    conn = sqlite3.connect(f"file:{data_dir / 'cases.db'}?mode=ro", uri=True, timeout=10)
    try:
        conn.execute("ATTACH DATABASE ? AS k", (f"file:{data_dir / 'keys.db'}?mode=ro",))
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("cases", "outbox", "k.keys")}
    finally:
        conn.close()


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (the daemon's worker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def log_leaks(daemon: Daemon, markers: list[str]) -> list[str]:
    """Log lines of the daemon that hold any of `markers` (tests.support.holds; must be empty)."""
    lines = daemon.log.read_text(errors="replace").splitlines()
    return [line for line in lines if any(holds(line, m) for m in markers)]


class RawSmtp:
    """A bare SMTP client on 127.0.0.1 that sends exactly the bytes it is given; `source` is another
    loopback address to connect from (127.0.0.2 is a second client to the daemon)."""

    def __init__(self, port: int, timeout: float = 10.0, source: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply; b"" when the server closed the connection."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b"".join(lines)
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line + b"\r\n")
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def replies_until_quiet(self, quiet: float = 1.0) -> list[bytes]:
        """Every reply that arrives until the server stays silent for `quiet` seconds."""
        out = []
        self.sock.settimeout(quiet)
        try:
            while True:
                r = self.reply()
                if not r:
                    break
                out.append(r)
        except TimeoutError:
            pass
        return out

    def close(self) -> None:
        self.sock.close()


def shared_daemon(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Daemon, CaptureRelay]]:
    """One daemon and capture relay for a whole test module (use as a module-scoped fixture's body)."""
    relay = CaptureRelay().start()
    daemon = Daemon(write_config(tmp_path_factory.mktemp(name), relay.port)).start()
    try:
        yield daemon, relay
    finally:
        daemon.stop()
        relay.stop()
