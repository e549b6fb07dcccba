"""Inbound items and cases: commit what arrives, load what is due, apply a stage's outcome, hold a failure."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from typing import Any

from careservice.budget import SCAN, first_fit
from careservice.crypto import Keyring, open_sealed, seal
from careservice.model import Case, CaseState, ContactDetails, Envelope, Inbound, MailKind, NewMessage, Outcome, Source
from careservice.store.blocks import block
from careservice.store.keys import case_key, day_end
from careservice.store.mailq import queue_mail
from careservice.store.purge import add_stat, drop_item, purge_case
from careservice.store.rota import take_turn
from careservice.store.schema import StoreError
from careservice.store.shards import clause
from careservice.store.tallies import take_ack_slots

log = logging.getLogger("careservice.store")
_CASE_COLUMNS = "id, site, state, source, created, nonce, target, meta, raw, failures"


def meta(case: Case) -> bytes:
    # vars, not asdict: ContactDetails holds strings only, and asdict deep-copies each field
    return json.dumps({
        "mail_from": case.message.envelope.mail_from, "rcpt": case.message.envelope.rcpt,
        "contact": vars(case.contact) if case.contact else None, "subject": case.subject,
        "message_id": case.message_id, "references": list(case.references), "owner": case.owner,
        "reminded": case.reminded, "route": case.route, "language": case.language,
    }).encode()


def add_inbound(conn: sqlite3.Connection, keyring: Keyring, messages: list[NewMessage], now: float) -> list[str]:
    ids = []
    for m in messages:
        # k.seen, beside the keys: SQLite commits cases.db first, so a digest is durable only with its case. It
        # lasts as long as the day's secret that keyed it. One statement: on PostgreSQL a round trip less, and a
        # node that commits the same message meanwhile makes this one a duplicate instead of a failed call.
        if m.dedupe and not conn.execute("INSERT INTO k.seen VALUES (?, ?) ON CONFLICT DO NOTHING RETURNING 1",
                                         (m.dedupe, day_end(now))).fetchone():
            ids.append("")
            continue
        case_id = secrets.token_hex(6)
        key, wrapped = keyring.new_case_key(case_id)
        case = Case(case_id, m.site, CaseState.RECEIVED, now, secrets.token_hex(4),
                    Inbound(m.source, m.envelope, m.raw), m.contact)
        conn.execute("INSERT INTO k.keys VALUES (?, ?)", (case_id, wrapped))
        conn.execute(
            "INSERT INTO cases(id, site, state, source, created, next_run, nonce, target, meta, raw) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (case_id, m.site, case.state, m.source, now, now, case.nonce, "",
             seal(key, meta(case), case_id.encode() + b"meta"), seal(key, m.raw, case_id.encode() + b"raw")),
        )
        ids.append(case_id)
    return ids


def load_case(conn: sqlite3.Connection, keyring: Keyring, row: tuple[Any, ...]) -> Case:
    case_id, site, state, source, created, nonce, target, meta_blob, raw_blob, failures = row
    key = case_key(conn, keyring, case_id)
    meta = json.loads(open_sealed(key, meta_blob, case_id.encode() + b"meta"))
    return Case(
        id=case_id, site=site, state=CaseState(state), created=created, nonce=nonce,
        message=Inbound(Source(source), Envelope(meta["mail_from"], meta["rcpt"]),
                        open_sealed(key, raw_blob, case_id.encode() + b"raw")),
        contact=ContactDetails(**meta["contact"]) if meta["contact"] else None,
        subject=meta["subject"], message_id=meta["message_id"], references=tuple(meta["references"]),
        target=target, failures=failures, owner=meta.get("owner", ""),  # not in cases stored before #assign
        reminded=meta.get("reminded", 0), route=meta.get("route", ""), language=meta.get("language", ""),
    )


def due_cases(conn: sqlite3.Connection, keyring: Keyring, states: tuple[CaseState, ...], now: float,
               limit: int, max_bytes: int, exclude: tuple[str, ...], shard: tuple[int, int]) -> list[Case]:
    marks = ",".join("?" * len(states))
    sized = conn.execute(  # length() reads a blob's size, not the blob
        f"SELECT id, length(meta) + length(raw) FROM cases WHERE state IN ({marks}) AND next_run <= ?"
        f"{clause('id', shard)} ORDER BY next_run LIMIT ?", (*states, now, SCAN * limit + len(exclude)),
    ).fetchall()
    skip = set(exclude)
    chosen = first_fit(((case_id, size) for case_id, size in sized if case_id not in skip), limit, max_bytes)
    select = f"SELECT {_CASE_COLUMNS} FROM cases WHERE id=?"  # one at a time: a sealed copy is dropped once opened
    return [load_case(conn, keyring, conn.execute(select, (case_id,)).fetchone()) for case_id in chosen]


def get_case(conn: sqlite3.Connection, keyring: Keyring, case_id: str) -> Case | None:
    row = conn.execute(f"SELECT {_CASE_COLUMNS} FROM cases WHERE id=?", (case_id,)).fetchone()
    return load_case(conn, keyring, row) if row else None


def apply(conn: sqlite3.Connection, keyring: Keyring, case: Case, outcome: Outcome, now: float,
           next_run: float) -> None:
    if not conn.execute("SELECT 1 FROM cases WHERE id=? AND state=?", (case.id, case.state)).fetchone():
        raise StoreError(f"case {case.id} changed under a stage")
    updated = outcome.updates or case
    if outcome.target_state is not None and not conn.execute(
            "SELECT 1 FROM cases WHERE id=? AND state=?", (updated.target, CaseState.OPEN)).fetchone():
        # A staff reply moves its target only from OPEN. Replies that reach the worker together are
        # applied together, so another one may have moved it since the stage looked: this reply is
        # verified again, which sends its late notice, instead of answering twice.
        log.info("reply_target_changed case=%s target=%s", case.id, updated.target)
        outcome = Outcome(CaseState.STAFF_REPLY, "target_changed")
    if outcome.turn is not None:  # first: a turn another writer took leaves the whole outcome unapplied
        take_turn(conn, case.site, outcome.turn)
    mails, counters = outcome.mails, outcome.counters
    if outcome.ack_slot is not None and not take_ack_slots(conn, keyring, outcome.ack_slot.limits,
                                                            int(now // 3600)):
        mails = tuple(m for m in mails if m.kind is not MailKind.ACK)
        counters = (*counters, "ack_suppressed")
    for name in counters:
        add_stat(conn, case.site, now, name)
    for mail in mails:
        queue_mail(conn, keyring, case.site, mail, now)
    if outcome.block is not None:
        block(conn, outcome.block)
    if outcome.target_state is CaseState.PURGED:
        purge_case(conn, updated.target)
    elif outcome.target_state is not None:
        conn.execute("UPDATE cases SET state=? WHERE id=?", (outcome.target_state, updated.target))
    if outcome.target_owner:
        set_owner(conn, keyring, updated.target, outcome.target_owner)
    if outcome.state is CaseState.PURGED:
        drop_item(conn, case.id)
        return
    key = case_key(conn, keyring, case.id)
    conn.execute(
        "UPDATE cases SET state=?, next_run=?, target=?, meta=?, failures=0 WHERE id=?",
        (outcome.state, next_run, updated.target, seal(key, meta(updated), case.id.encode() + b"meta"), case.id),
    )


def set_owner(conn: sqlite3.Connection, keyring: Keyring, case_id: str, owner: str) -> None:
    """Record the staff member a case is assigned to, in its sealed meta (a case gone meanwhile has none)."""
    row = conn.execute("SELECT meta FROM cases WHERE id=?", (case_id,)).fetchone()
    if row is None:
        return
    key, aad = case_key(conn, keyring, case_id), case_id.encode() + b"meta"
    fields = json.loads(open_sealed(key, row[0], aad))
    conn.execute("UPDATE cases SET meta=? WHERE id=?", (seal(key, json.dumps({**fields, "owner": owner}).encode(), aad),
                                                        case_id))


def hold(conn: sqlite3.Connection, keyring: Keyring, case_id: str, state: CaseState, failures: int,
          retry_at: float) -> None:
    conn.execute("UPDATE cases SET failures=?, next_run=? WHERE id=? AND state=?", (failures, retry_at, case_id, state))
