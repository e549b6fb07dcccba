"""Read-only SQL for the admin listener and `careservice stats`: the store's state now, and its daily counters.

Each call opens its own read-only connection, as `careservice status` does: a scrape or a statistics
page never waits in the intake's writer queue and never writes. The state is counts and ages only
(on PostgreSQL, the cluster's: every node reports the same queue).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careservice.settings import StoreConfig
from careservice.store.schema import OPEN_STATES, StoreError

BUSY_MS = 5000
PROBE_BUSY_MS = 2000


@dataclass(frozen=True)
class Live:
    open_cases: dict[str, int]  # site id -> cases forwarded and not yet purged
    stuck_cases: int
    queued: int
    oldest_queued: float | None  # creation time of the oldest mail waiting for the relay
    mailboxes: dict[str, bool]  # IMAP mailbox name (as the config builds it) -> working


def connect(data_dir: Path) -> sqlite3.Connection:
    path = data_dir / "cases.db"
    if not path.exists():
        raise StoreError(f"no store in {data_dir} (service.data_dir): has `careservice run` started with this config?")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
    return conn


@contextlib.contextmanager
def _reading(data_dir: Path, backend: StoreConfig | None) -> Iterator[Any]:
    """A connection for reads: SQLite's file read-only, in one snapshot; or PostgreSQL's cases database
    (through a transaction that is rolled back)."""
    if backend is not None and backend.shared:
        from careservice.store.pg.tx import session

        with session(backend.url, backend.keys_url) as tx:
            yield tx
        return
    conn = connect(data_dir)
    try:
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def live(data_dir: Path, backend: StoreConfig | None = None) -> Live:
    """The store's state now (on PostgreSQL: the cluster's)."""
    with _reading(data_dir, backend) as conn:
        marks = ",".join("?" * len(OPEN_STATES))
        open_cases = dict(conn.execute(f"SELECT site, count(*) FROM cases WHERE state IN ({marks}) GROUP BY site",
                                       OPEN_STATES).fetchall())
        stuck = conn.execute("SELECT count(*) FROM cases WHERE failures > 0").fetchone()[0]
        queued, oldest = conn.execute("SELECT count(*), min(created) FROM outbox").fetchone()
        mailboxes = {name: bool(ok) for name, ok in conn.execute("SELECT name, ok FROM mailbox_health")}
        return Live(open_cases, stuck, queued, oldest, mailboxes)


def daily(data_dir: Path, first_day: str, last_day: str,
          backend: StoreConfig | None = None) -> dict[tuple[str, str], dict[str, int]]:
    """The per-site daily counters from `first_day` to `last_day` (YYYY-MM-DD, UTC): (site, day) -> name -> n."""
    with _reading(data_dir, backend) as conn:
        counters: dict[tuple[str, str], dict[str, int]] = {}
        for site, day, name, value in conn.execute(
                "SELECT site, day, name, value FROM stats WHERE day BETWEEN ? AND ?", (first_day, last_day)):
            counters.setdefault((site, day), {})[name] = value
        return counters


def writable(data_dir: Path, backend: StoreConfig | None = None) -> bool:
    """Whether the store takes a write transaction now (begun and rolled back: nothing is written); on
    PostgreSQL, whether this node reaches a primary of both databases."""
    if backend is not None and backend.shared:
        from careservice.store.pg.tx import session

        try:
            with session(backend.url, backend.keys_url) as tx:
                return not any(conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] for conn in (tx.cases, tx.keys))
        except StoreError:
            return False
    try:
        conn = sqlite3.connect(f"file:{data_dir / 'cases.db'}?mode=rw", uri=True, isolation_level=None,
                               timeout=PROBE_BUSY_MS / 1000)
    except sqlite3.Error:
        return False
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()
