"""Deleting case data for good, and the per-site counters that outlive it.

Each function runs inside a store transaction (careservice.store); deleting a case's key is what
makes every copy of its data unreadable, so each of them takes the key with the rows.
"""

from __future__ import annotations

import sqlite3
import time

from careservice.crypto import Keyring
from careservice.store.keys import delete_key
from careservice.tta import bucket_name


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def add_stat(conn: sqlite3.Connection, site: str, now: float, name: str) -> None:
    """Count one event for `site` today (statistics hold per-site daily counts, nothing of a case)."""
    conn.execute(
        "INSERT INTO stats VALUES (?,?,?,1) ON CONFLICT(site, day, name) DO UPDATE SET value = stats.value + 1",
        (site, _day(now), name),
    )


def purge_case(conn: sqlite3.Connection, case_id: str) -> None:
    """Delete a case, everything queued for it, and its key."""
    conn.execute("DELETE FROM outbox WHERE case_id=?", (case_id,))
    conn.execute("DELETE FROM cases WHERE id=?", (case_id,))
    delete_key(conn, case_id)


def drop_item(conn: sqlite3.Connection, case_id: str) -> None:
    """Delete a case row; its key goes too unless queued mail still needs it."""
    conn.execute("DELETE FROM cases WHERE id=?", (case_id,))
    if not conn.execute("SELECT 1 FROM outbox WHERE case_id=? LIMIT 1", (case_id,)).fetchone():
        delete_key(conn, case_id)


def answered(conn: sqlite3.Connection, site: str, case_id: str, now: float) -> float | None:
    """Purge a case whose answer the relay took, counting how long it waited; the seconds it waited
    (None: the case was gone already)."""
    row = conn.execute("SELECT created FROM cases WHERE id=?", (case_id,)).fetchone()
    if row is None:
        return None
    waited = now - row[0]
    add_stat(conn, site, now, bucket_name(waited))
    purge_case(conn, case_id)
    return waited


def purge_aged(conn: sqlite3.Connection, keyring: Keyring, cutoff: float, sites: frozenset[str],
               now: float) -> list[tuple[str, str, float]]:
    """Purge every case created before `cutoff`, whatever its state or site, with its mail and key, and
    mail queued before it for a case already gone (state "purged"); returns (case id, state, created)
    of each. Each counts as `purged_hard_limit` for its site while the site is in `sites`."""
    aged = conn.execute(
        "SELECT id, site, state, created FROM cases WHERE created < ? UNION ALL SELECT case_id, min(site), 'purged', "
        "min(created) FROM outbox WHERE created < ? AND case_id NOT IN (SELECT id FROM cases) GROUP BY case_id",
        (cutoff, cutoff),
    ).fetchall()
    for case_id, site, _, _ in aged:
        purge_case(conn, case_id)
        if site in sites:
            add_stat(conn, site, now, "purged_hard_limit")
    return [(case_id, state, created) for case_id, _, state, created in aged]


def sweep_orphans(conn: sqlite3.Connection, keyring: Keyring) -> None:
    """After a crash between the two files' commits: drop rows without a key and keys without rows."""
    # the rows to drop are found in the (id) and (case_id) indexes: a scan of the tables themselves read
    # every case's and queued mail's whole row, under write.lock, while the other process's commits wait
    conn.execute("DELETE FROM cases WHERE rowid IN (SELECT rowid FROM cases WHERE id NOT IN (SELECT id FROM k.keys))")
    conn.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE case_id NOT IN (SELECT id FROM k.keys))")
    conn.execute(
        "DELETE FROM k.keys WHERE id NOT IN (SELECT id FROM cases) AND id NOT IN (SELECT case_id FROM outbox)"
    )
