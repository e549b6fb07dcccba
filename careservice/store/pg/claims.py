"""What several nodes sharing one PostgreSQL need beyond the shared SQL: claims, leases, the orphan sweep.

A worker claims the due cases and mail it takes with FOR UPDATE SKIP LOCKED (nodes asking at the
same moment get different rows) and marks them claimed_by itself until lease_until: a node that
dies mid-case leaves its claims to expire, and another node's next round takes them. A claim ends
when its case or mail moves on (the end_claim trigger of pg.schema).
"""

from __future__ import annotations

from typing import Any

from careservice.budget import first_fit
from careservice.crypto import Keyring
from careservice.model import Case, CaseState, QueuedMail
from careservice.store.cases import get_case
from careservice.store.mailq import load_mail
from careservice.store.pg.tx import PgTx

ORPHAN_KEY_AGE = 600.0  # a key without rows younger than this may belong to a commit in progress on another node


def due_cases(tx: PgTx, keyring: Keyring, states: tuple[CaseState, ...], now: float, limit: int, max_bytes: int,
              exclude: tuple[str, ...], node: str, lease: float) -> list[Case]:
    sized = tx.execute(
        "SELECT id, length(meta) + length(raw) FROM cases WHERE state = ANY(?) AND next_run <= ? AND lease_until <= ? "
        "AND id <> ALL(?) ORDER BY next_run LIMIT ? FOR UPDATE SKIP LOCKED",
        ([str(s) for s in states], now, now, list(exclude), limit),
    ).fetchall()
    chosen = _claim(tx, "cases", first_fit(sized, limit, max_bytes), now, node, lease)
    return [case for case in (get_case(tx, keyring, case_id) for case_id in chosen) if case is not None]


def due_mail(tx: PgTx, keyring: Keyring, now: float, limit: int, max_bytes: int, node: str,
             lease: float) -> list[QueuedMail]:
    sized = tx.execute(
        "SELECT id, length(meta) + length(message) FROM outbox WHERE next_attempt <= ? AND lease_until <= ? "
        "ORDER BY next_attempt LIMIT ? FOR UPDATE SKIP LOCKED", (now, now, limit),
    ).fetchall()
    chosen = _claim(tx, "outbox", first_fit(sized, limit, max_bytes), now, node, lease)
    return [load_mail(tx, keyring, row_id) for row_id in chosen]


def _claim(tx: PgTx, table: str, chosen: list[Any], now: float, node: str, lease: float) -> list[Any]:
    """Mark the rows chosen as this node's until now + lease. They were read FOR UPDATE SKIP LOCKED, and
    only `limit` of them (not budget.SCAN times as many, as on SQLite): rows locked and left unchosen
    would be skipped by the other nodes until this transaction ends."""
    tx.execute(f"UPDATE {table} SET claimed_by=?, lease_until=? WHERE id = ANY(?)", (node, now + lease, chosen))
    return chosen


def renew_claims(tx: PgTx, keyring: Keyring, node: str, case_ids: list[str], mail_ids: list[int], now: float,
                 lease: float) -> None:
    """Extend this node's claims on the cases and mail it is working on now: a batch of mail sent over few
    connections may take longer than one lease, and must not be taken over (and sent twice) while this node
    is alive and sending. Only those: a claim whose outcome this node failed to record must expire."""
    for table, ids in (("cases", case_ids), ("outbox", mail_ids)):
        if ids:
            tx.execute(f"UPDATE {table} SET lease_until=? WHERE id = ANY(?) AND claimed_by=?", (now + lease, ids, node))


def take_lease(tx: PgTx, keyring: Keyring, name: str, holder: str, now: float, seconds: float) -> bool:
    """Hold (or keep holding) the lease `name` until now + seconds, unless another holder's is running."""
    return tx.execute(
        "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, "
        "until=excluded.until WHERE leases.holder=excluded.holder OR leases.until <= ? RETURNING holder",
        (name, holder, now + seconds, now),
    ).fetchone() is not None


def drop_lease(tx: PgTx, keyring: Keyring, name: str, holder: str) -> None:
    tx.execute("DELETE FROM leases WHERE name=? AND holder=?", (name, holder))


def sweep_orphans(tx: PgTx, keyring: Keyring, now: float) -> None:
    """Rows whose key is gone (a purge whose cases commit failed after its keys commit) and keys without
    rows (an intake commit that failed between the two). Safe beside other nodes' commits: the cases
    are read before the keys (a case's key commits before it, so a case seen has its key seen unless
    a purge took it), and only keys older than any commit in progress count as orphans."""
    rows = {case_id for (case_id,) in tx.execute("SELECT id FROM cases UNION SELECT case_id FROM outbox")}
    keyed = {case_id: created for case_id, created in tx.execute("SELECT id, created FROM k.keys")}
    keyless = [case_id for case_id in rows if case_id not in keyed]
    if keyless:
        tx.execute("DELETE FROM cases WHERE id = ANY(?)", (keyless,))
        tx.execute("DELETE FROM outbox WHERE case_id = ANY(?)", (keyless,))
    unused = [case_id for case_id, created in keyed.items() if case_id not in rows and created < now - ORPHAN_KEY_AGE]
    if unused:
        tx.execute("DELETE FROM k.keys WHERE id = ANY(?)", (unused,))
