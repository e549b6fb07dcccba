"""Case keys, bound to their case, and the random secret of the day that keys the pseudonymous digests."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
from collections.abc import Iterator

from careservice.crypto import Keyring
from careservice.store.schema import StoreError

UNBOUND_KEY_BYTES = 12 + 32 + 16  # nonce, key, tag: a case key as version 0.1 wrapped it
# .keys: the case keys unwrapped in this thread's transaction (None for one it deleted), or None outside one
_remembered = threading.local()


@contextlib.contextmanager
def remembering() -> Iterator[None]:
    """Within the block (one transaction, on SQLite or PostgreSQL), each case key is read and unwrapped
    once: applying a new case's outcome needed its key three times (its forward, its ack, its meta), and
    the outbox twice (forward and ack). Forgotten when the block ends, so no key outlives its transaction
    in memory; a purge inside it forgets the case's key at once, and the key counts as gone for the rest
    of the transaction (delete_key), also where the deletion itself waits for the commit (PostgreSQL)."""
    _remembered.keys = {}
    try:
        yield
    finally:
        _remembered.keys = None


def case_key(conn: sqlite3.Connection, keyring: Keyring, case_id: str) -> bytes:
    memo: dict[str, bytes | None] | None = getattr(_remembered, "keys", None)
    if memo is not None and case_id in memo:
        remembered = memo[case_id]
        if remembered is not None:
            return remembered
        row = None  # deleted in this transaction
    else:
        row = conn.execute("SELECT wrapped FROM k.keys WHERE id=?", (case_id,)).fetchone()
    if row is None:
        raise StoreError(f"no key for case {case_id}")
    key = keyring.unwrap(row[0], f"case:{case_id}")
    if memo is not None:
        memo[case_id] = key
    return key


def delete_key(conn: sqlite3.Connection, case_id: str) -> None:
    """Delete a case's key; for the rest of this transaction it is gone, also from the memo."""
    conn.execute("DELETE FROM k.keys WHERE id=?", (case_id,))
    memo: dict[str, bytes | None] | None = getattr(_remembered, "keys", None)
    if memo is not None:
        memo[case_id] = None


def bind_unbound_keys(conn: sqlite3.Connection, keyring: Keyring) -> None:
    """Rewrap the case keys of version 0.1 (one fixed label for all) bound to their case ids."""
    for case_id, wrapped in conn.execute("SELECT id, wrapped FROM k.keys WHERE length(wrapped) = ?",
                                         (UNBOUND_KEY_BYTES,)).fetchall():
        conn.execute("UPDATE k.keys SET wrapped=? WHERE id=?",
                     (keyring.wrap(keyring.unwrap_unbound(wrapped), f"case:{case_id}"), case_id))


def rotate_digests(conn: sqlite3.Connection, keyring: Keyring, now: float) -> None:
    """Today's digest secret (made on the first call of the day), and everything keyed by an older
    one deleted with it: its secret, the de-duplication digests, past hours' acknowledgement counts."""
    day = int(now // 86400)
    select = "SELECT wrapped FROM k.daily WHERE day=?"
    row = conn.execute(select, (day,)).fetchone()
    if row is None:  # another node sharing the store may make the day's secret at the same moment: one wins
        conn.execute("INSERT INTO k.daily VALUES (?, ?) ON CONFLICT(day) DO NOTHING",
                     (day, keyring.wrap(secrets.token_bytes(32), f"daily:{day}")))
        row = conn.execute(select, (day,)).fetchone()
    secret = keyring.unwrap(row[0], f"daily:{day}")
    conn.execute("DELETE FROM k.daily WHERE day < ?", (day,))
    conn.execute("DELETE FROM k.seen WHERE expires <= ?", (now,))
    conn.execute("DELETE FROM ack_rate WHERE hour < ?", (int(now // 3600),))
    keyring.use_daily_secret(secret)


def day_end(now: float) -> float:
    return (now // 86400 + 1) * 86400


def rewrap_keys(conn: sqlite3.Connection, keyring: Keyring) -> int:
    """Wrap every case key and day secret under the current master key (rotate-master-key); how many were not."""
    done = 0
    for table, label in (("keys", "case:{}"), ("daily", "daily:{}")):
        column = "id" if table == "keys" else "day"
        for row_id, wrapped in conn.execute(f"SELECT {column}, wrapped FROM k.{table}").fetchall():
            rewrapped = keyring.rewrap(wrapped, label.format(row_id))
            if rewrapped is not None:
                conn.execute(f"UPDATE k.{table} SET wrapped=? WHERE {column}=?", (rewrapped, row_id))
                done += 1
    return done
