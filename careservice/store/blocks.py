"""Senders a staff member marked "#spam", kept in keys.db as keyed digests (Keyring.block_digest) with
their expiry, never as addresses; expired ones are deleted by the worker's sweep."""

from __future__ import annotations

import sqlite3

from careservice.crypto import Keyring
from careservice.model import SenderBlock


def block(conn: sqlite3.Connection, sender_block: SenderBlock) -> None:
    for digest in sender_block.digests:
        conn.execute("INSERT INTO k.blocks VALUES (?, ?) ON CONFLICT(digest) DO UPDATE SET expires = excluded.expires",
                     (digest, sender_block.until))


def blocked(conn: sqlite3.Connection, keyring: Keyring, digests: tuple[bytes, ...], now: float) -> bool:
    marks = ",".join("?" * len(digests))
    return bool(digests) and conn.execute(f"SELECT 1 FROM k.blocks WHERE digest IN ({marks}) AND expires > ? LIMIT 1",
                                          (*digests, now)).fetchone() is not None


def prune(conn: sqlite3.Connection, keyring: Keyring, now: float) -> None:
    conn.execute("DELETE FROM k.blocks WHERE expires <= ?", (now,))
