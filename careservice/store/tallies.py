"""What outlives a case: per-site daily statistics and hourly acknowledgement counts; status counts."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from careservice.crypto import Keyring
from careservice.model import CaseState
from careservice.settings import StoreConfig
from careservice.store.schema import INBOUND_STATES, OPEN_STATES, StoreError, connect


def read_status(data_dir: Path, backend: StoreConfig | None = None) -> dict[str, Any]:
    """Counts for `careservice status`, read through a separate read-only connection (on PostgreSQL:
    the cluster's counts, whichever node asks)."""
    if backend is not None and backend.shared:
        from careservice.store.pg.tx import session

        with session(backend.url, backend.keys_url) as tx:
            return status_counts(tx)  # type: ignore[arg-type]
    if not (data_dir / "cases.db").exists():
        raise StoreError(f"no store in {data_dir} (service.data_dir): has `careservice run` started with "
                         "this config?")
    conn = connect(data_dir, read_only=True)
    try:
        return status_counts(conn)
    finally:
        conn.close()


def status_counts(conn: sqlite3.Connection) -> dict[str, Any]:
    def count(states: tuple[CaseState, ...]) -> int:
        marks = ",".join("?" * len(states))
        return conn.execute(f"SELECT count(*) FROM cases WHERE state IN ({marks})", states).fetchone()[0]

    return {
        "open_cases": count(OPEN_STATES),
        "inbound_pending": count(INBOUND_STATES),
        "outbound_queued": conn.execute("SELECT count(*) FROM outbox").fetchone()[0],
        "stuck_cases": conn.execute("SELECT count(*) FROM cases WHERE failures > 0").fetchone()[0],
        **({"imap": {
            name: {"ok": bool(ok), "problem": problem, "since": since, "consecutive_failures": failures}
            for name, ok, problem, since, failures in conn.execute("SELECT * FROM mailbox_health ORDER BY name")
        }} if conn.execute("SELECT 1 FROM mailbox_health LIMIT 1").fetchone() else {}),
    }


def add_stats(conn: sqlite3.Connection, keyring: Keyring, counts: dict[tuple[str, str, str], int]) -> None:
    conn.executemany("INSERT INTO stats VALUES (?,?,?,?) ON CONFLICT(site, day, name) DO UPDATE SET "
                     "value = stats.value + excluded.value", [(*key, n) for key, n in counts.items()])


def take_ack_slots(conn: sqlite3.Connection, keyring: Keyring, limits: tuple[tuple[bytes, int], ...],
                   hour: int) -> bool:
    """Count one acknowledgement under every (digest, limit) this hour, or under none if any is used up.
    Past hours' counts are not read; the sweep deletes them (careservice.store.keys.rotate_digests)."""
    marks = ",".join("?" * len(limits))
    counted = dict(conn.execute(f"SELECT digest, n FROM ack_rate WHERE hour=? AND digest IN ({marks})",
                                (hour, *(digest for digest, _ in limits))).fetchall())
    if any(counted.get(digest, 0) >= limit for digest, limit in limits):
        return False
    # one statement for all of them (on PostgreSQL one round trip, not one each); a row once, since a statement
    # may not update a row twice there
    digests = list(dict.fromkeys(digest for digest, _ in limits))
    conn.execute(f"INSERT INTO ack_rate VALUES {','.join(['(?,?,1)'] * len(digests))} "
                 "ON CONFLICT(digest, hour) DO UPDATE SET n = ack_rate.n + 1",
                 [value for digest in digests for value in (digest, hour)])
    return True


def counts_op(conn: sqlite3.Connection, keyring: Keyring) -> dict[str, Any]:
    return status_counts(conn)


def mailbox_health(conn: sqlite3.Connection, keyring: Keyring, name: str, problem: str, now: float) -> None:
    row = conn.execute("SELECT ok, problem, since, failures FROM mailbox_health WHERE name=?", (name,)).fetchone()
    failures = 0 if not problem else (row[3] + 1 if row else 1)
    since = row[2] if row and row[1] == problem else now
    conn.execute("INSERT INTO mailbox_health VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET ok=excluded.ok, "
                 "problem=excluded.problem, since=excluded.since, failures=excluded.failures",
                 (name, int(not problem), problem, since, failures))
