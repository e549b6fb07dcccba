"""The floor with the product's least work: what the durable intake goal stands against once the cycle does
what the privacy promise and the workflow ask of any implementation, not only careservice's.

WorkCycle is bench.cyclefloor's floor with, for each case, only this, each step done once with the design's
libraries (cryptography, email, Jinja2):
- the intake seals the message under a fresh AES-256-GCM data key and wraps that key under a master key; the
  writer thread commits the wrapped key to keys.db and the sealed message to cases.db in one transaction, both
  synchronous=FULL, so that deleting a key later shreds every copy of its case (WAL frames, backups);
- the relay process unwraps each key and opens its message, parses it (email, compat32) for its sender,
  subject and text, renders the forward (with a MAC'd reply address, so that only genuine answers come back)
  and the acknowledgement from careservice's own templates into messages, sends both, and marks the case
  forwarded: the case stays, sealed, until its answer. It runs at careservice's worker's CPU priority (nice 10).
careservice does more besides: limits, dedupe, routing, languages, a workflow table, logging and metrics. None
of that is here, so this floor's intake rate beside its relay is the most a design that keeps the promise with
these libraries reaches in CPython on this machine.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
from email import policy
from email.parser import BytesParser
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any

import jinja2
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.cyclefloor import BATCH, SENDER, STAFF, PlainCycle
from bench.floor import open_mail_db
from careservice.crypto import open_sealed, seal
from careservice.smtpclient import Mail
from careservice.worker import NICENESS

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "mail" / "en"
PARSER = BytesParser(policy=policy.compat32)  # the default policy parses each header into objects: ~0.5 ms
SITE = {"name": "TicketNest", "care_address": SENDER}
CaseRow = tuple[int, bytes, bytes]  # case id, wrapped data key, sealed message


def _open(path: Path) -> sqlite3.Connection:
    conn = open_mail_db(path)  # cases.db: WAL, synchronous=FULL, the busy timeout both processes need
    conn.execute("ATTACH DATABASE ? AS k", (str(path.with_name("keys.db")),))
    conn.execute("PRAGMA k.journal_mode=WAL")
    conn.execute("PRAGMA k.synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS k.keys(id INTEGER PRIMARY KEY, wrapped BLOB NOT NULL)")
    conn.execute("CREATE TABLE IF NOT EXISTS cases(id INTEGER PRIMARY KEY, forwarded INTEGER NOT NULL DEFAULT 0,"
                 " sealed BLOB NOT NULL)")
    conn.execute("CREATE INDEX IF NOT EXISTS open_cases ON cases(id) WHERE forwarded=0")
    return conn


class WorkCycle(PlainCycle):
    """The intake's sealing and two-file commit, and the relay's opening, parsing, rendering and marking (see the
    module's docstring). The master key is made here and reaches both processes with this object."""

    def __init__(self) -> None:
        self.master = AESGCM.generate_key(bit_length=256)
        self._templates: dict[str, jinja2.Template] | None = None

    def open(self, path: Path) -> sqlite3.Connection:
        return _open(path)

    def prepare(self, content: bytes) -> CaseRow:
        key = AESGCM.generate_key(bit_length=256)
        return int.from_bytes(os.urandom(8)) >> 1, seal(self.master, key, b""), seal(key, content, b"")

    def insert(self, conn: sqlite3.Connection, items: list[CaseRow]) -> None:
        conn.executemany("INSERT INTO k.keys(id, wrapped) VALUES (?, ?)", [(i, wrapped) for i, wrapped, _ in items])
        conn.executemany("INSERT INTO cases(id, sealed) VALUES (?, ?)", [(i, sealed) for i, _, sealed in items])

    def open_relay(self, path: Path) -> sqlite3.Connection:
        os.nice(NICENESS)  # as careservice's worker, so that the intake's 250s come first here too
        conn = _open(path)
        conn.execute("PRAGMA synchronous=NORMAL")  # as careservice's worker: a lost mark only sends again
        return conn

    def take(self, conn: sqlite3.Connection) -> list[tuple[int, tuple[Mail, Mail]]]:
        rows = conn.execute("SELECT c.id, k.wrapped, c.sealed FROM cases c JOIN k.keys k USING (id)"
                            " WHERE c.forwarded=0 LIMIT ?", (BATCH,)).fetchall()
        return [(row[0], self._mails(row)) for row in rows]

    def done(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        conn.execute("BEGIN")  # not IMMEDIATE, which would lock keys.db too, crosswise to the intake's commit
        conn.executemany("UPDATE cases SET forwarded=1 WHERE id=?", [(case_id,) for case_id in ids])
        conn.execute("COMMIT")

    def _mails(self, row: CaseRow) -> tuple[Mail, Mail]:
        case_id, wrapped, sealed = row
        msg = PARSER.parsebytes(open_sealed(open_sealed(self.master, wrapped, b""), sealed, b""))
        name, address = parseaddr(msg["From"] or "")
        text = msg.get_payload(decode=True) if not msg.is_multipart() else b""
        context = {"site": SITE, "case_id": case_id, "subject": str(msg["Subject"] or ""),
                   "contact": {"name": name, "email": address, "preferred_contact": "email"},
                   "text": text.decode("utf-8", "replace"), "follow_up": False}
        mac = hmac.new(self.master, str(case_id).encode(), "sha256").hexdigest()[:20]
        return (Mail(SENDER, [STAFF], self._render("forward.txt", context, STAFF,
                                                   f"Reply-To: care+{case_id}.{mac}@floor.bench.localhost\r\n")),
                Mail(SENDER, [address], self._render("ack.txt", context, address, "")))

    def _render(self, template: str, context: dict[str, Any], to: str, extra: str) -> bytes:
        """The template's text as a plain-text message, its headers written directly: the email package's
        EmailMessage and default policy cost about 1 ms a message here, more than all the rest."""
        if self._templates is None:  # in the relay process: Jinja2's objects do not travel to it
            env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True,
                                     auto_reload=False)
            self._templates = {name: env.get_template(name) for name in ("forward.txt", "ack.txt")}
        subject, _, text = self._templates[template].render(context).partition("\n")
        body = text.replace("\n", "\r\n").encode()
        head = (f"From: {SENDER}\r\nTo: {to}\r\n{extra}Subject: {subject.removeprefix('Subject: ')}\r\n"
                f"Date: {formatdate()}\r\nMessage-ID: {make_msgid(domain='floor.bench.localhost')}\r\n"
                f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}\r\n\r\n")
        return head.encode() + body


FLOORS: dict[str, tuple[bool, type[PlainCycle]]] = {"floor + the product's least work, uvloop": (True, WorkCycle)}
