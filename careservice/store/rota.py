"""Who is next and what went out today: the round robin turns of each site's routes, and the day of each
site's last digest. Neither holds anything of a case: a turn is a counter, a digest day a date."""

from __future__ import annotations

import json
import sqlite3

from careservice.crypto import Keyring, open_sealed
from careservice.model import CaseState, OpenCase, OutgoingMail, Turn
from careservice.store.keys import case_key
from careservice.store.mailq import queue_mail
from careservice.store.purge import add_stat
from careservice.store.schema import StoreError


class TurnTaken(StoreError):
    """Another writer took this turn since the stage read it: the case is tried again."""


def turns(conn: sqlite3.Connection, keyring: Keyring, site: str) -> dict[str, int]:
    """Each route's turn at `site` ("" for the site's own staff); a route not listed is at 0."""
    return dict(conn.execute("SELECT route, turn FROM route_turns WHERE site=?", (site,)).fetchall())


def take_turn(conn: sqlite3.Connection, site: str, turn: Turn) -> None:
    """Move the route's counter on from the value the stage chose by, or raise TurnTaken."""
    # one statement: nodes sharing a PostgreSQL store may take the same turn at once, and one of them wins
    if conn.execute("INSERT INTO route_turns VALUES (?,?,?) ON CONFLICT(site, route) DO UPDATE SET turn=excluded.turn "
                    "WHERE route_turns.turn=? RETURNING turn", (site, turn.route, turn.seen + 1, turn.seen)
                    ).fetchone() is None:
        raise TurnTaken(f"turn {turn.seen} of a route at {site} was taken")


def digest_day(conn: sqlite3.Connection, keyring: Keyring, site: str) -> str:
    """The local date ("2026-12-02") of the site's last digest, "" for none."""
    row = conn.execute("SELECT day FROM digest_days WHERE site=?", (site,)).fetchone()
    return row[0] if row else ""


def open_for_digest(conn: sqlite3.Connection, keyring: Keyring, site: str) -> list[OpenCase]:
    """The site's cases waiting for staff (state OPEN), oldest first; only their meta is opened."""
    listed = []
    for case_id, created, nonce, blob in conn.execute(
            "SELECT id, created, nonce, meta FROM cases WHERE site=? AND state=? ORDER BY created",
            (site, CaseState.OPEN)).fetchall():
        meta = json.loads(open_sealed(case_key(conn, keyring, case_id), blob, case_id.encode() + b"meta"))
        listed.append(OpenCase(case_id, created, nonce, meta.get("owner", ""), meta.get("route", "")))
    return listed


def queue_digest(conn: sqlite3.Connection, keyring: Keyring, site: str, day: str, filed_under: str,
                 mails: tuple[OutgoingMail, ...], now: float) -> bool:
    """Queue the site's digest of `day` (none at all when `mails` is empty) unless that day's went already;
    whether it was queued. The mails are filed under a key of their own, made here: no case's purge takes
    them, and the outbox deletes the key with the last of them (store.mailq)."""
    if conn.execute("INSERT INTO digest_days VALUES (?,?) ON CONFLICT(site) DO UPDATE SET day=excluded.day "
                    "WHERE digest_days.day <> excluded.day RETURNING day", (site, day)).fetchone() is None:
        return False  # that day's went already (from another node too: one statement, one winner)
    if not mails:
        return False
    conn.execute("INSERT INTO k.keys VALUES (?, ?)", (filed_under, keyring.new_case_key(filed_under)[1]))
    for mail in mails:
        queue_mail(conn, keyring, site, mail, now)
    add_stat(conn, site, now, "digests")
    return True
