"""The tables, opening the two database files with the settings the purge promise needs, and truncating the WAL."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from careservice.model import CaseState

log = logging.getLogger("careservice.store")

OPEN_STATES = (CaseState.NEW, CaseState.ACKNOWLEDGE, CaseState.OPEN, CaseState.ANSWERING)
INBOUND_STATES = (CaseState.RECEIVED, CaseState.FOLLOW_UP, CaseState.STAFF_REPLY, CaseState.VERIFIED,
                  CaseState.COMMAND)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cases(
    id TEXT PRIMARY KEY, site TEXT NOT NULL, state TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, next_run REAL NOT NULL, nonce TEXT NOT NULL, target TEXT NOT NULL,
    meta BLOB NOT NULL, raw BLOB NOT NULL, failures INTEGER NOT NULL DEFAULT 0);
DROP INDEX IF EXISTS cases_due;
CREATE INDEX IF NOT EXISTS cases_by_state ON cases(state, next_run, site);
CREATE INDEX IF NOT EXISTS cases_stuck ON cases(failures) WHERE failures > 0;
CREATE INDEX IF NOT EXISTS cases_created ON cases(created);
CREATE TABLE IF NOT EXISTS outbox(
    id INTEGER PRIMARY KEY, case_id TEXT NOT NULL, site TEXT NOT NULL, kind TEXT NOT NULL,
    created REAL NOT NULL, next_attempt REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    meta BLOB NOT NULL, message BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt);
CREATE INDEX IF NOT EXISTS outbox_case ON outbox(case_id);
CREATE TABLE IF NOT EXISTS stats(
    site TEXT NOT NULL, day TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY(site, day, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ack_rate(
    digest BLOB NOT NULL, hour INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY(digest, hour)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ack_rate_hour ON ack_rate(hour);
CREATE TABLE IF NOT EXISTS k.seen(digest BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailbox_health(
    name TEXT PRIMARY KEY, ok INTEGER NOT NULL, problem TEXT NOT NULL, since REAL NOT NULL,
    failures INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS route_turns(
    site TEXT NOT NULL, route TEXT NOT NULL, turn INTEGER NOT NULL, PRIMARY KEY(site, route)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest_days(site TEXT PRIMARY KEY, day TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS k.keys(id TEXT PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS k.blocks(digest BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS k.daily(day INTEGER PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
"""


class StoreError(Exception):
    """The store could not commit; the caller must not acknowledge anything."""


def connect(data_dir: Path, read_only: bool = False, durable: bool = True,
            sync_commits: bool | None = None) -> sqlite3.Connection:
    """sync_commits: whether COMMIT itself syncs (synchronous=FULL); by default when durable. A caller
    that passes False for a durable store syncs the WALs itself before it answers anyone."""
    if read_only:
        conn = sqlite3.connect(f"file:{data_dir / 'cases.db'}?mode=ro", uri=True, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=5000")
        return conn
    if durable:  # the intake owns data_dir; the worker must never create a new, empty store elsewhere
        data_dir.mkdir(parents=True, exist_ok=True)
    elif not (data_dir / "cases.db").exists():
        raise sqlite3.OperationalError(f"no store in {data_dir}")
    full = durable if sync_commits is None else sync_commits
    conn = sqlite3.connect(data_dir / "cases.db", isolation_level=None)
    conn.execute("ATTACH DATABASE ? AS k", (str(data_dir / "keys.db"),))
    for schema in ("main", "k"):
        conn.execute(f"PRAGMA {schema}.journal_mode=WAL")
        conn.execute(f"PRAGMA {schema}.synchronous={'FULL' if full else 'NORMAL'}")
        conn.execute(f"PRAGMA {schema}.secure_delete=ON")
        conn.execute(f"PRAGMA {schema}.journal_size_limit=0")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA busy_timeout=5000")
    # no checkpoint inside a commit, where it would hold write.lock while it copies and syncs:
    # the worker's WalCheckpointer runs them outside the lock (the purges' TRUNCATE stays under it)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.executescript(SCHEMA)
    if "failures" not in {row[1] for row in conn.execute("PRAGMA table_info(cases)")}:  # a store from 0.1
        conn.execute("ALTER TABLE cases ADD COLUMN failures INTEGER NOT NULL DEFAULT 0")
    make_private(data_dir)
    return conn


def make_private(data_dir: Path) -> None:
    """data_dir 0700 and the files in it 0600, whatever the umask or an earlier version left."""
    os.chmod(data_dir, 0o700)
    for entry in os.scandir(data_dir):
        if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & 0o077:
            os.chmod(entry.path, 0o600)


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database and truncate it to zero bytes, so no purged page stays in it."""
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as exc:
        log.warning("wal_checkpoint_failed error=%s", exc.sqlite_errorname)
        return
    if busy:
        log.warning("wal_checkpoint_busy: a reader held the WAL; the next purge truncates it")
