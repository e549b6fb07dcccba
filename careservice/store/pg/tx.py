"""One store transaction over the two PostgreSQL databases, offering the sqlite3 calls the store's SQL uses.

careservice.store's functions take a connection and run portable SQL with `?` parameters, naming the
keys database's tables `k.<table>`. PgTx sends a statement to the keys database when it names
`k.keys`, `k.blocks` or `k.daily`, else to the cases database (`k.seen` too: see pg.schema), with
`%s` parameters. Each store call of a group commit runs in a savepoint of the databases it writes to, so one
failing call does not undo the others. A call alone needs none, nor does a database a call only reads: two
round trips less each. A read that fails in SQL there leaves that database's transaction aborted with no
savepoint to return to: then the whole transaction fails, and every call of it hears StoreError.

Commit order: keys first, then cases, then the key deletions the calls asked for, in a commit of their
own. A crash between them leaves at worst a key without rows (swept once it is older than a commit can
take): never a committed case without its key, so a 250 is never given for data that cannot be read, and
never a row whose key is gone while the work it fed was rolled back. (With the deletions in the first
commit, a worker killed between the two lost a staff reply: its key was gone, the answer made from it was
not queued, and the keyless reply was swept.)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg

from careservice.store.schema import StoreError

log = logging.getLogger("careservice.store")
KEYS_TABLES = frozenset({"keys", "blocks", "daily"})
_TABLE = re.compile(r"\bk\.(\w+)")
# Statements after which a case or a mail may be due: the other nodes' workers hear of them (NOTIFY).
_WAKES = ("INSERT INTO cases", "INSERT INTO outbox", "UPDATE cases SET state")
_KEY_DELETION = "DELETE FROM k.keys"


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> tuple[bool, bool, str]:
    """(for the keys database, whether it may write, the statement in psycopg's dialect)."""
    tables = set(_TABLE.findall(sql))
    keys = bool(tables & KEYS_TABLES)
    if keys and tables - KEYS_TABLES or keys and re.search(r"\b(FROM|INTO|JOIN|UPDATE)\s+(?!k\.)\w", sql):
        raise ValueError(f"a statement spans the two databases: {sql}")  # a programming error
    writes = not sql.startswith("SELECT") or " FOR " in sql  # a locking read counts as a write
    return keys, writes, _TABLE.sub(r"\1", sql).replace("%", "%%").replace("?", "%s")


class PgTx:
    """The connection a store call gets: `execute`, `executemany`, as sqlite3's."""

    def __init__(self, cases: psycopg.Connection, keys: psycopg.Connection, alone: bool = False) -> None:
        self.cases = cases
        self.keys = keys
        self.alone = alone  # the transaction's only call: no savepoints, it fails or commits as a whole
        self.wakes = False  # a statement made something due: NOTIFY before commit
        self._open: list[psycopg.Connection] = []  # the databases the current call holds a savepoint in
        self.key_deletions: list[tuple[str, Sequence[Any]]] = []  # run after the cases commit (delete_keys)
        self._call_deletions: list[tuple[str, Sequence[Any]]] = []  # the current call's, kept if it succeeds

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        keys, writes, statement = translate(sql)
        if sql.startswith(_KEY_DELETION):
            self._call_deletions.append((statement, params))
            return self.keys.cursor()  # nothing to read: a DELETE's cursor has no rows either
        conn = self.keys if keys else self.cases
        if writes and conn not in self._open and not self.alone:
            conn.execute("SAVEPOINT op")
            self._open.append(conn)
        if not keys and sql.startswith(_WAKES):
            self.wakes = True
        return conn.execute(statement, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            self.execute(sql, row)

    def end_call(self, ok: bool) -> None:
        """Release the current call's savepoints, or roll back to them."""
        for conn in self._open:
            if not ok:
                conn.execute("ROLLBACK TO SAVEPOINT op")
            conn.execute("RELEASE SAVEPOINT op")
        self._open = []
        if ok:
            self.key_deletions += self._call_deletions
        self._call_deletions = []

    def delete_keys(self) -> None:
        """The key deletions of the committed calls, committed on their own; if they fail, the keys
        stay without rows, and the sweep deletes them once they are older than a commit can take."""
        if not self.key_deletions:
            return
        try:
            for statement, params in self.key_deletions:
                self.keys.execute(statement, params)
            self.keys.commit()
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                self.keys.rollback()
            log.warning("pg_key_deletion_failed keys=%d sqlstate=%s", len(self.key_deletions),
                        getattr(exc, "sqlstate", ""))

    def _aborted_without_savepoint(self) -> bool:
        return any(conn.info.transaction_status is psycopg.pq.TransactionStatus.INERROR
                   for conn in (self.cases, self.keys) if conn not in self._open)

    def run(self, fn: Any, keyring: Any, args: tuple[Any, ...]) -> Any:
        """One store call in its savepoints; its result, or its exception (the others go on; a call alone
        is rolled back by the caller)."""
        try:
            result = fn(self, keyring, *args)
        except Exception as exc:
            if self.cases.broken or self.keys.broken or not self.alone and self._aborted_without_savepoint():
                raise  # the connection is gone, or a read failed where no savepoint can undo it: all fail
            self.end_call(ok=False)
            log.warning("pg_call_failed call=%s error=%s sqlstate=%s", getattr(fn, "__name__", "?"),
                        type(exc).__name__, getattr(exc, "sqlstate", ""))
            return exc
        self.end_call(ok=True)
        return result


@contextlib.contextmanager
def session(url: str, keys_url: str) -> Iterator[PgTx]:
    """A PgTx over fresh connections for a one-off command (`careservice status`): read, then rolled back."""
    try:
        with psycopg.connect(url, connect_timeout=5) as cases, psycopg.connect(keys_url, connect_timeout=5) as keys:
            try:
                yield PgTx(cases, keys)
            finally:
                cases.rollback()
                keys.rollback()
    except psycopg.Error as exc:
        raise StoreError(f"store: PostgreSQL: {type(exc).__name__}: {exc}".strip()) from None
