"""What a lawful disclosure reads: the open cases (no personal data but the owner's staff address), and
one open case with the mail still queued under it."""

from __future__ import annotations

import json
import sqlite3

from careservice.crypto import Keyring, open_sealed
from careservice.model import Case, QueuedMail
from careservice.store.cases import get_case
from careservice.store.keys import case_key
from careservice.store.mailq import load_mail
from careservice.store.schema import OPEN_STATES


def open_cases(conn: sqlite3.Connection, keyring: Keyring) -> list[tuple[str, str, str, float, str]]:
    """(id, site, state, created, owner) of every open case, oldest first; only the meta is opened."""
    marks = ",".join("?" * len(OPEN_STATES))
    out = []
    for case_id, site, state, created, blob in conn.execute(
            f"SELECT id, site, state, created, meta FROM cases WHERE state IN ({marks}) ORDER BY created",
            OPEN_STATES).fetchall():
        meta = json.loads(open_sealed(case_key(conn, keyring, case_id), blob, case_id.encode() + b"meta"))
        out.append((case_id, site, state, created, meta.get("owner", "")))
    return out


def open_case(conn: sqlite3.Connection, keyring: Keyring, case_id: str) -> tuple[Case, list[QueuedMail]] | None:
    """The open case `case_id` and its queued mail, in queue order; None when it is not open (or gone)."""
    case = get_case(conn, keyring, case_id)
    if case is None or case.state not in OPEN_STATES:
        return None
    rows = conn.execute("SELECT id FROM outbox WHERE case_id=? ORDER BY id", (case_id,)).fetchall()
    return case, [load_mail(conn, keyring, row_id) for (row_id,) in rows]
