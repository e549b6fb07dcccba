"""The outbox queue: mail sealed under its case's key, handed out when due, and what the relay said of it."""

from __future__ import annotations

import json
import sqlite3

from careservice.budget import SCAN, first_fit
from careservice.crypto import Keyring, open_sealed, seal
from careservice.model import CaseState, MailKind, Outcome, OutgoingMail, QueuedMail
from careservice.store.keys import case_key
from careservice.store.purge import add_stat, answered, drop_item
from careservice.store.shards import clause


def queue_mail(conn: sqlite3.Connection, keyring: Keyring, site: str, mail: OutgoingMail, now: float) -> None:
    key = case_key(conn, keyring, mail.case_id)
    meta = json.dumps({"sender": mail.sender, "recipients": list(mail.recipients), "message_id": mail.message_id,
                       "route": mail.route, "owner": mail.owner})
    row_id = conn.execute(  # RETURNING, not lastrowid: the same SQL runs on PostgreSQL
        "INSERT INTO outbox(case_id, site, kind, created, next_attempt, meta, message) VALUES (?,?,?,?,?,?,?) "
        "RETURNING id", (mail.case_id, site, mail.kind, now, now, b"", b""),
    ).fetchone()[0]
    aad = f"{mail.case_id}:{row_id}".encode()
    conn.execute(
        "UPDATE outbox SET meta=?, message=? WHERE id=?",
        (seal(key, meta.encode(), aad + b"meta"), seal(key, mail.message, aad + b"msg"), row_id),
    )


def due_mail(conn: sqlite3.Connection, keyring: Keyring, now: float, limit: int, max_bytes: int,
             shard: tuple[int, int]) -> list[QueuedMail]:
    sized = conn.execute(
        f"SELECT id, length(meta) + length(message) FROM outbox WHERE next_attempt <= ?{clause('case_id', shard)} "
        "ORDER BY next_attempt LIMIT ?", (now, SCAN * limit),
    ).fetchall()
    return [load_mail(conn, keyring, row_id) for row_id in first_fit(sized, limit, max_bytes)]


def load_mail(conn: sqlite3.Connection, keyring: Keyring, row_id: int) -> QueuedMail:
    case_id, site, kind, created, attempts, meta_blob, msg_blob = conn.execute(
        "SELECT case_id, site, kind, created, attempts, meta, message FROM outbox WHERE id=?", (row_id,)
    ).fetchone()
    key = case_key(conn, keyring, case_id)
    aad = f"{case_id}:{row_id}".encode()
    meta = json.loads(open_sealed(key, meta_blob, aad + b"meta"))
    mail = OutgoingMail(MailKind(kind), case_id, meta["sender"], tuple(meta["recipients"]),
                        open_sealed(key, msg_blob, aad + b"msg"), meta["message_id"],
                        meta.get("route", ""), meta.get("owner", ""))  # not in mail queued before they were carried
    return QueuedMail(row_id, site, attempts, created, mail)


def mail_delivered(conn: sqlite3.Connection, keyring: Keyring, item: QueuedMail, outcome: Outcome | None,
                    now: float) -> float | None:
    """Drop the delivered mail and apply the workflow's outcome for its case (a purged one counts its
    time to answer); the seconds the case waited, when purged."""
    waited = None
    if outcome is not None:
        for name in outcome.counters:
            add_stat(conn, item.site, now, name)
        if outcome.state is CaseState.PURGED:
            waited = answered(conn, item.site, item.mail.case_id, now)
    conn.execute("DELETE FROM outbox WHERE id=?", (item.id,))
    if not conn.execute("SELECT 1 FROM cases WHERE id=?", (item.mail.case_id,)).fetchone():
        drop_item(conn, item.mail.case_id)
    return waited


def mail_deferred(conn: sqlite3.Connection, keyring: Keyring, row_id: int, next_attempt: float) -> None:
    conn.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt=? WHERE id=?", (next_attempt, row_id))


def mail_failed(conn: sqlite3.Connection, keyring: Keyring, item: QueuedMail, outcome: Outcome | None,
                 now: float) -> None:
    """Drop the failed mail and apply the workflow's outcome for its case (reopened, staff told)."""
    add_stat(conn, item.site, now, f"{item.mail.kind}_failed")
    conn.execute("DELETE FROM outbox WHERE id=?", (item.id,))
    if outcome is not None:
        conn.execute("UPDATE cases SET state=?, nonce=COALESCE(NULLIF(?, ''), nonce) WHERE id=? AND state=?",
                     (outcome.state, outcome.nonce, item.mail.case_id, CaseState.ANSWERING))
        for mail in outcome.mails:
            queue_mail(conn, keyring, item.site, mail, now)
    if not conn.execute("SELECT 1 FROM cases WHERE id=?", (item.mail.case_id,)).fetchone():
        drop_item(conn, item.mail.case_id)
