"""The durable case store: the only module that speaks SQL, with careservice.purge for deleting.

SQLite in WAL mode with secure_delete=ON. The intake's store is `durable` (synchronous=FULL: a
commit is on disk before the 250). The worker's is not (NORMAL: its transitions may roll back on
power loss, which only repeats a send - delivery is at-least-once); a purge is still on disk at
once, since the WAL checkpoint that follows it syncs the database. Every personal byte is sealed
with AES-256-GCM under a per-case data key; the wrapped keys live in a separate database file
(keys.db), so deleting a key makes every copy of its case unreadable. One writer thread owns the
connection and commits whatever is waiting as one transaction (group commit), each call inside
its own savepoint, and resolves the callers' futures only after COMMIT.

The worker's store is `inline` instead: the calls made in one turn of the caller's loop run
in its thread, reads in one snapshot and writes in one transaction, each in its own savepoint.
The worker has no listener to keep responsive, and with a writer thread its transactions waited
for the GIL between statements (the worker's loop busy rendering) while holding the write lock,
so the intake's commits waited too: 10-25 ms per worker transaction, measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from careservice.budget import first_fit
from careservice.crypto import Keyring, open_sealed, seal
from careservice.model import (
    Case,
    CaseState,
    ContactDetails,
    Envelope,
    MailKind,
    NewMessage,
    Outcome,
    OutgoingMail,
    QueuedMail,
    Source,
)
from careservice.purge import add_stat, answered, drop_item, purge_aged, purge_case, sweep_orphans

log = logging.getLogger("careservice.store")

OPEN_STATES = (CaseState.NEW, CaseState.ACKNOWLEDGE, CaseState.OPEN, CaseState.ANSWERING)
INBOUND_STATES = (CaseState.RECEIVED, CaseState.FOLLOW_UP, CaseState.STAFF_REPLY, CaseState.VERIFIED)
MAX_BATCH = 256
UNBOUND_KEY_BYTES = 12 + 32 + 16  # nonce, key, tag: a case key as version 0.1 wrapped it
SCAN = 4  # rows looked at per row wanted: a batch closed by bytes fills up with the small ones behind

SCHEMA = """
CREATE TABLE IF NOT EXISTS cases(
    id TEXT PRIMARY KEY, site TEXT NOT NULL, state TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, next_run REAL NOT NULL, nonce TEXT NOT NULL, target TEXT NOT NULL,
    meta BLOB NOT NULL, raw BLOB NOT NULL, failures INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS cases_due ON cases(state, next_run);
CREATE INDEX IF NOT EXISTS cases_created ON cases(created);
CREATE TABLE IF NOT EXISTS outbox(
    id INTEGER PRIMARY KEY, case_id TEXT NOT NULL, site TEXT NOT NULL, kind TEXT NOT NULL,
    created REAL NOT NULL, next_attempt REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    meta BLOB NOT NULL, message BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt);
CREATE INDEX IF NOT EXISTS outbox_case ON outbox(case_id);
CREATE TABLE IF NOT EXISTS stats(
    site TEXT NOT NULL, day TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY(site, day, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ack_rate(
    digest BLOB NOT NULL, hour INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY(digest, hour)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ack_rate_hour ON ack_rate(hour);
CREATE TABLE IF NOT EXISTS k.seen(digest BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailbox_health(
    name TEXT PRIMARY KEY, ok INTEGER NOT NULL, problem TEXT NOT NULL, since REAL NOT NULL,
    failures INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS k.keys(id TEXT PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS k.daily(day INTEGER PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
"""


class StoreError(Exception):
    """The store could not commit; the caller must not acknowledge anything."""


@dataclass
class _Op:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    checkpoint: bool
    write: bool
    future: asyncio.Future[Any]  # the caller's, resolved after COMMIT
    loop: asyncio.AbstractEventLoop


def _connect(data_dir: Path, read_only: bool = False, durable: bool = True) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(f"file:{data_dir / 'cases.db'}?mode=ro", uri=True, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=5000")
        return conn
    if durable:  # the intake owns data_dir; the worker must never create a new, empty store elsewhere
        data_dir.mkdir(parents=True, exist_ok=True)
    elif not (data_dir / "cases.db").exists():
        raise sqlite3.OperationalError(f"no store in {data_dir}")
    conn = sqlite3.connect(data_dir / "cases.db", isolation_level=None)
    conn.execute("ATTACH DATABASE ? AS k", (str(data_dir / "keys.db"),))
    for schema in ("main", "k"):
        conn.execute(f"PRAGMA {schema}.journal_mode=WAL")
        conn.execute(f"PRAGMA {schema}.synchronous={'FULL' if durable else 'NORMAL'}")
        conn.execute(f"PRAGMA {schema}.secure_delete=ON")
        conn.execute(f"PRAGMA {schema}.journal_size_limit=0")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(SCHEMA)
    if "failures" not in {row[1] for row in conn.execute("PRAGMA table_info(cases)")}:  # a store from 0.1
        conn.execute("ALTER TABLE cases ADD COLUMN failures INTEGER NOT NULL DEFAULT 0")
    make_private(data_dir)
    return conn


def make_private(data_dir: Path) -> None:
    """data_dir 0700 and the files in it 0600, whatever the umask or an earlier version left."""
    os.chmod(data_dir, 0o700)
    for entry in os.scandir(data_dir):
        if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & 0o077:
            os.chmod(entry.path, 0o600)


def read_status(data_dir: Path) -> dict[str, Any]:
    """Counts for `careservice status`, read through a separate read-only connection."""
    if not (data_dir / "cases.db").exists():
        raise StoreError(f"no store in {data_dir} (service.data_dir): has `careservice run` started with "
                         "this config?")
    conn = _connect(data_dir, read_only=True)
    try:
        return _counts(conn)
    finally:
        conn.close()


def _counts(conn: sqlite3.Connection) -> dict[str, Any]:
    def count(states: tuple[CaseState, ...]) -> int:
        marks = ",".join("?" * len(states))
        return conn.execute(f"SELECT count(*) FROM cases WHERE state IN ({marks})", states).fetchone()[0]

    return {
        "open_cases": count(OPEN_STATES),
        "inbound_pending": count(INBOUND_STATES),
        "outbound_queued": conn.execute("SELECT count(*) FROM outbox").fetchone()[0],
        "stuck_cases": conn.execute("SELECT count(*) FROM cases WHERE failures > 0").fetchone()[0],
        **({"imap": {
            name: {"ok": bool(ok), "problem": problem, "since": since, "consecutive_failures": failures}
            for name, ok, problem, since, failures in conn.execute("SELECT * FROM mailbox_health ORDER BY name")
        }} if conn.execute("SELECT 1 FROM mailbox_health LIMIT 1").fetchone() else {}),
    }


class Store:
    """Async facade over the writer thread (inline: the caller's thread). `await start()`, then `await close()`."""

    def __init__(self, data_dir: Path, keyring: Keyring, durable: bool = True, inline: bool = False) -> None:
        self.data_dir = data_dir
        self.durable = durable
        self.inline = inline
        self.keyring = keyring
        self._conn: sqlite3.Connection | None = None  # inline only; else the writer thread's own
        self._turn = asyncio.Lock()  # inline: one transaction at a time (the flock is per process)
        self._pending: list[_Op] = []  # inline: the calls of this loop turn, committed together
        self._committing: set[asyncio.Future[None]] = set()
        self._truncation: asyncio.Future[None] | None = None  # inline: the WAL truncation purges wait for
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._write_lock = -1  # flock()ed around each transaction: the intake and worker processes share the files

    # ----- lifecycle and the writer thread -----

    async def start(self, sweep: bool) -> None:
        """Open the store; `sweep` drops what a process killed between the two files' commits left
        (rows without a key, a key without rows). Both processes sweep as they start: under the write
        lock, so the other process's commits are never seen half done."""
        if self.inline:
            try:
                self._conn, self._write_lock = self._open()
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"cannot open store in {self.data_dir}: {exc}") from None
        else:
            self._thread = threading.Thread(target=self._run, name="careservice-store", daemon=True)
            self._thread.start()
            await asyncio.to_thread(self._ready.wait)
            if self._open_error is not None:
                raise StoreError(f"cannot open store in {self.data_dir}: {self._open_error}")
        if sweep:
            await self._call(sweep_orphans, checkpoint=True)
            await self._call(_bind_unbound_keys)
        await self.rotate_digests(time.time())

    async def close(self) -> None:
        """Close the store; a call from then on raises StoreError (a task left over at shutdown must
        not wait for a writer thread that is gone: that kept stopped workers alive)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if self._truncation is not None:
                self._truncation.cancel()  # closing truncates the WAL anyway
            self._shut(conn)
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._queue.put(None)
            await asyncio.to_thread(thread.join)

    async def _call(self, fn: Callable[..., Any], *args: Any, checkpoint: bool = False, write: bool = True) -> Any:
        if self._conn is None and self._thread is None:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        op = _Op(fn, args, checkpoint, write, loop.create_future(), loop)
        if self._conn is None:
            self._queue.put(op)
        else:
            if not self._pending:
                loop.call_soon(self._commit_pending)
            self._pending.append(op)
        return await op.future

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A call that only reads: it runs in a snapshot under the shared lock, beside other readers."""
        return await self._call(fn, *args, write=False)

    def _open(self) -> tuple[sqlite3.Connection, int]:
        conn = _connect(self.data_dir, durable=self.durable)
        return conn, os.open(self.data_dir / "write.lock", os.O_RDWR | os.O_CREAT, 0o600)

    def _shut(self, conn: sqlite3.Connection) -> None:
        _checkpoint(conn)
        conn.close()
        os.close(self._write_lock)

    def _run(self) -> None:
        try:
            conn, self._write_lock = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        while not stopping:
            op = self._queue.get()
            if op is None:
                break
            batch = [op]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit_batch(conn, batch)
        self._shut(conn)

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        for ops, write in _reads_then_writes(batch):
            results = self._transaction(conn, ops, write)
            for op, result in zip(ops, results, strict=True):
                op.loop.call_soon_threadsafe(_resolve, op.future, result)

    def _transaction(self, conn: sqlite3.Connection, ops: list[_Op], write: bool) -> list[Any]:
        fcntl.flock(self._write_lock, _lock_mode(write))
        try:
            return self._locked_transaction(conn, ops, write, any(op.checkpoint for op in ops))
        finally:
            fcntl.flock(self._write_lock, fcntl.LOCK_UN)

    def _commit_pending(self) -> None:
        """Commit the calls of the loop turn that just ended (inline store; see the module text)."""
        batch, self._pending = self._pending, []
        for ops, write in _reads_then_writes(batch):
            task = asyncio.ensure_future(self._inline(ops, write))
            self._committing.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._committing.discard)

    async def _inline(self, ops: list[_Op], write: bool) -> None:
        """Run `ops` as one transaction in this thread; purges then wait for a WAL truncation."""
        try:
            async with self._holding(write):
                if self._conn is None:
                    raise StoreError("the store is closed")
                conn = self._conn
                results = self._locked_transaction(conn, ops, write, checkpoint=False)
            if any(op.checkpoint for op in ops):
                await self._truncate_wal(conn)
        except asyncio.CancelledError:  # the loop is shutting down: so are the callers
            for op in ops:
                op.future.cancel()
            raise
        except Exception as exc:  # the lock or the truncation failed: every caller hears of it
            results = [exc if isinstance(exc, StoreError) else StoreError(type(exc).__name__)] * len(ops)
        for op, result in zip(ops, results, strict=True):
            _resolve(op.future, result)

    async def _truncate_wal(self, conn: sqlite3.Connection) -> None:
        """Truncate the WAL once for all purges committed before it starts: answers are delivered over
        several relay connections at once, and one truncation each halved the answer rate (measured)."""
        if self._truncation is None or self._truncation.done():  # done: it failed before it began
            self._truncation = asyncio.ensure_future(self._truncate_soon(conn))
        await asyncio.shield(self._truncation)

    async def _truncate_soon(self, conn: sqlite3.Connection) -> None:
        await asyncio.sleep(0)  # the purges committing in this turn of the loop join this truncation
        async with self._holding(write=True):
            self._truncation = None  # a purge committed from now on needs the next one
            _checkpoint(conn)

    @contextlib.asynccontextmanager
    async def _holding(self, write: bool) -> AsyncIterator[None]:
        """The write lock (shared for reads), one holder at a time in this process; a lock held by the
        other process is waited for in a helper thread, so the loop serves the relay meanwhile."""
        async with self._turn:
            mode = _lock_mode(write)
            try:
                fcntl.flock(self._write_lock, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, self._write_lock, mode))
                try:
                    await asyncio.shield(waiting)
                except asyncio.CancelledError:  # the helper still takes the lock: give it back at once
                    waiting.add_done_callback(lambda _: fcntl.flock(self._write_lock, fcntl.LOCK_UN))
                    raise
            try:
                yield
            finally:
                fcntl.flock(self._write_lock, fcntl.LOCK_UN)

    def _locked_transaction(self, conn: sqlite3.Connection, ops: list[_Op], write: bool,
                            checkpoint: bool) -> list[Any]:
        results: list[Any] = []
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    results.append(op.fn(conn, self.keyring, *op.args))
                    conn.execute("RELEASE op")
                except Exception as exc:  # one failing call must not undo the others
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append(exc if isinstance(exc, StoreError) else StoreError(type(exc).__name__))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [StoreError(f"commit failed: {exc.sqlite_errorname}")] * len(ops)
        else:
            if checkpoint:
                _checkpoint(conn)
        return results

    # ----- the operations the rest of the code calls -----

    async def add_inbound(self, messages: list[NewMessage], now: float) -> list[str]:
        """Commit inbound messages durably; returns their ids ('' for a de-duplicated one)."""
        return await self._call(_add_inbound, messages, now)

    async def due_cases(self, states: Iterable[CaseState], now: float, limit: int, max_bytes: int,
                        exclude: set[str]) -> list[Case]:
        """Due cases in next_run order: at most `limit`, and `max_bytes` stored (see budget.first_fit)."""
        return await self._read(_due_cases, tuple(states), now, limit, max_bytes, tuple(exclude))

    async def get_case(self, case_id: str) -> Case | None:
        return await self._read(_get_case, case_id)

    async def apply(self, case: Case, outcome: Outcome, now: float, next_run: float) -> None:
        """Write a stage's outcome and the mail it causes in one transaction."""
        purging = CaseState.PURGED in (outcome.state, outcome.target_state)
        await self._call(_apply, case, outcome, now, next_run, checkpoint=purging)

    async def hold(self, case: Case, failures: int, retry_at: float) -> None:
        """Keep a case whose stage failed out of the due list until `retry_at` (counted as stuck)."""
        await self._call(_hold, case.id, case.state, failures, retry_at)

    async def due_mail(self, now: float, limit: int, max_bytes: int) -> list[QueuedMail]:
        """Due mail in next_attempt order: at most `limit`, and `max_bytes` stored (see budget.first_fit)."""
        return await self._read(_due_mail, now, limit, max_bytes)

    async def mail_delivered(self, item: QueuedMail, outcome: Outcome | None, now: float) -> float | None:
        """Drop a delivered mail; a delivered answer purges its case in the same transaction. Returns the
        seconds an answered case waited for its answer (None for other mail, or a case already gone)."""
        answer = item.mail.kind is MailKind.ANSWER
        return await self._call(_mail_delivered, item, outcome, now, checkpoint=answer)

    async def mail_deferred(self, item: QueuedMail, next_attempt: float) -> None:
        await self._call(_mail_deferred, item.id, next_attempt)

    async def mail_failed(self, item: QueuedMail, outcome: Outcome | None, now: float) -> None:
        """Drop a mail the relay refused for good; queue `notice` to staff in the same transaction."""
        await self._call(_mail_failed, item, outcome, now)

    async def rotate_digests(self, now: float) -> None:
        """Switch the keyring to today's digest secret and drop every digest of an earlier day (both
        processes call it at start and then every minute; the first call of a day makes the secret)."""
        await self._call(_rotate_digests, now, checkpoint=True)

    async def purge_older_than(self, cutoff: float, sites: frozenset[str], now: float) -> list[tuple[str, str, float]]:
        """Purge every case created before `cutoff`, whatever its state (see purge.purge_aged)."""
        return await self._call(purge_aged, cutoff, sites, now)

    async def checkpoint(self) -> None:
        """Truncate the WAL now (a purge's own checkpoint may have met a reader)."""
        await self._call(_nothing, checkpoint=True)

    async def take_ack_slot(self, digest: bytes, now: float, limit: int) -> bool:
        """Count one acknowledgement for a (digested) address this hour; False once over `limit`."""
        return await self._call(_take_ack_slot, digest, int(now // 3600), limit)

    async def counts(self) -> dict[str, Any]:
        return await self._read(_counts_op)

    async def add_stats(self, counts: dict[tuple[str, str, str], int]) -> None:
        """Add to the per-site daily counters: (site, day, name) -> n."""
        await self._call(_add_stats, counts)

    async def mailbox_health(self, name: str, problem: str, now: float) -> None:
        """Record an IMAP mailbox's health for `status --json` ("" = working; else a short code)."""
        await self._call(_mailbox_health, name, problem, now)


def _reads_then_writes(batch: list[_Op]) -> Iterator[tuple[list[_Op], bool]]:
    """A batch as its reads (one snapshot under the shared lock), then its writes (one transaction)."""
    for write in (False, True):
        ops = [op for op in batch if op.write is write]
        if ops:
            yield ops, write


def _lock_mode(write: bool) -> int:
    """Writers take the lock exclusively (the kernel queues the two processes; SQLite's own busy wait
    sleeps). Readers share it: a commit spans cases.db and keys.db, which are not atomic together in
    WAL mode, so a reader must not look between the two files' commits."""
    return fcntl.LOCK_EX if write else fcntl.LOCK_SH


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database and truncate it to zero bytes, so no purged page stays in it."""
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as exc:
        log.warning("wal_checkpoint_failed error=%s", exc.sqlite_errorname)
        return
    if busy:
        log.warning("wal_checkpoint_busy: a reader held the WAL; the next purge truncates it")


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.cancelled():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


# ----- SQL: each runs in the writer thread inside its own savepoint -----


def _case_key(conn: sqlite3.Connection, keyring: Keyring, case_id: str) -> bytes:
    row = conn.execute("SELECT wrapped FROM k.keys WHERE id=?", (case_id,)).fetchone()
    if row is None:
        raise StoreError(f"no key for case {case_id}")
    return keyring.unwrap(row[0], f"case:{case_id}")


def _meta(case: Case) -> bytes:
    return json.dumps({
        "mail_from": case.envelope.mail_from, "rcpt": case.envelope.rcpt,
        "contact": asdict(case.contact) if case.contact else None, "subject": case.subject,
        "message_id": case.message_id, "references": list(case.references),
    }).encode()


def _bind_unbound_keys(conn: sqlite3.Connection, keyring: Keyring) -> None:
    """Rewrap the case keys of version 0.1 (one fixed label for all) bound to their case ids."""
    for case_id, wrapped in conn.execute("SELECT id, wrapped FROM k.keys WHERE length(wrapped) = ?",
                                         (UNBOUND_KEY_BYTES,)).fetchall():
        conn.execute("UPDATE k.keys SET wrapped=? WHERE id=?",
                     (keyring.wrap(keyring.unwrap_unbound(wrapped), f"case:{case_id}"), case_id))


def _rotate_digests(conn: sqlite3.Connection, keyring: Keyring, now: float) -> None:
    """Today's digest secret (made on the first call of the day), and everything keyed by an older
    one deleted with it: its secret, the de-duplication digests, past hours' acknowledgement counts."""
    day = int(now // 86400)
    row = conn.execute("SELECT wrapped FROM k.daily WHERE day=?", (day,)).fetchone()
    if row is None:
        secret = secrets.token_bytes(32)
        conn.execute("INSERT INTO k.daily VALUES (?, ?)", (day, keyring.wrap(secret, f"daily:{day}")))
    else:
        secret = keyring.unwrap(row[0], f"daily:{day}")
    conn.execute("DELETE FROM k.daily WHERE day < ?", (day,))
    conn.execute("DELETE FROM k.seen WHERE expires <= ?", (now,))
    conn.execute("DELETE FROM ack_rate WHERE hour < ?", (int(now // 3600),))
    keyring.use_daily_secret(secret)


def _day_end(now: float) -> float:
    return (now // 86400 + 1) * 86400


def _add_inbound(conn: sqlite3.Connection, keyring: Keyring, messages: list[NewMessage], now: float) -> list[str]:
    ids = []
    for m in messages:
        if m.dedupe:
            # k.seen, beside the keys: SQLite commits cases.db first, so a digest is durable only with its case
            if conn.execute("SELECT 1 FROM k.seen WHERE digest=?", (m.dedupe,)).fetchone():
                ids.append("")
                continue
            conn.execute("INSERT INTO k.seen VALUES (?, ?)", (m.dedupe, _day_end(now)))  # its secret's life
        case_id = secrets.token_hex(6)
        key, wrapped = keyring.new_case_key(case_id)
        case = Case(case_id, m.site, CaseState.RECEIVED, m.source, now, secrets.token_hex(4), m.envelope, m.raw,
                    m.contact)
        conn.execute("INSERT INTO k.keys VALUES (?, ?)", (case_id, wrapped))
        conn.execute(
            "INSERT INTO cases(id, site, state, source, created, next_run, nonce, target, meta, raw) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (case_id, m.site, case.state, m.source, now, now, case.nonce, "",
             seal(key, _meta(case), case_id.encode() + b"meta"), seal(key, m.raw, case_id.encode() + b"raw")),
        )
        ids.append(case_id)
    return ids


def _load_case(conn: sqlite3.Connection, keyring: Keyring, row: tuple[Any, ...]) -> Case:
    case_id, site, state, source, created, nonce, target, meta_blob, raw_blob, failures = row
    key = _case_key(conn, keyring, case_id)
    meta = json.loads(open_sealed(key, meta_blob, case_id.encode() + b"meta"))
    return Case(
        id=case_id, site=site, state=CaseState(state), source=Source(source), created=created, nonce=nonce,
        envelope=Envelope(meta["mail_from"], meta["rcpt"]),
        raw=open_sealed(key, raw_blob, case_id.encode() + b"raw"),
        contact=ContactDetails(**meta["contact"]) if meta["contact"] else None,
        subject=meta["subject"], message_id=meta["message_id"], references=tuple(meta["references"]),
        target=target, failures=failures,
    )


_CASE_COLUMNS = "id, site, state, source, created, nonce, target, meta, raw, failures"


def _due_cases(conn: sqlite3.Connection, keyring: Keyring, states: tuple[CaseState, ...], now: float,
               limit: int, max_bytes: int, exclude: tuple[str, ...]) -> list[Case]:
    marks = ",".join("?" * len(states))
    sized = conn.execute(  # length() reads a blob's size, not the blob
        f"SELECT id, length(meta) + length(raw) FROM cases WHERE state IN ({marks}) AND next_run <= ? "
        "ORDER BY next_run LIMIT ?", (*states, now, SCAN * limit + len(exclude)),
    ).fetchall()
    skip = set(exclude)
    chosen = first_fit(((case_id, size) for case_id, size in sized if case_id not in skip), limit, max_bytes)
    select = f"SELECT {_CASE_COLUMNS} FROM cases WHERE id=?"  # one at a time: a sealed copy is dropped once opened
    return [_load_case(conn, keyring, conn.execute(select, (case_id,)).fetchone()) for case_id in chosen]


def _get_case(conn: sqlite3.Connection, keyring: Keyring, case_id: str) -> Case | None:
    row = conn.execute(f"SELECT {_CASE_COLUMNS} FROM cases WHERE id=?", (case_id,)).fetchone()
    return _load_case(conn, keyring, row) if row else None


def _queue_mail(conn: sqlite3.Connection, keyring: Keyring, site: str, mail: OutgoingMail, now: float) -> None:
    key = _case_key(conn, keyring, mail.case_id)
    meta = json.dumps({"sender": mail.sender, "recipients": list(mail.recipients), "message_id": mail.message_id})
    cur = conn.execute(
        "INSERT INTO outbox(case_id, site, kind, created, next_attempt, meta, message) VALUES (?,?,?,?,?,?,?)",
        (mail.case_id, site, mail.kind, now, now, b"", b""),
    )
    aad = f"{mail.case_id}:{cur.lastrowid}".encode()
    conn.execute(
        "UPDATE outbox SET meta=?, message=? WHERE id=?",
        (seal(key, meta.encode(), aad + b"meta"), seal(key, mail.message, aad + b"msg"), cur.lastrowid),
    )


def _apply(conn: sqlite3.Connection, keyring: Keyring, case: Case, outcome: Outcome, now: float,
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
    mails, counters = outcome.mails, outcome.counters
    if outcome.ack_slot is not None and not _take_ack_slot(conn, keyring, outcome.ack_slot.digest,
                                                           int(now // 3600), outcome.ack_slot.limit):
        mails = tuple(m for m in mails if m.kind is not MailKind.ACK)
        counters = (*counters, "ack_suppressed")
    for name in counters:
        add_stat(conn, case.site, now, name)
    for mail in mails:
        _queue_mail(conn, keyring, case.site, mail, now)
    if outcome.target_state is CaseState.PURGED:
        purge_case(conn, updated.target)
    elif outcome.target_state is not None:
        conn.execute("UPDATE cases SET state=? WHERE id=?", (outcome.target_state, updated.target))
    if outcome.state is CaseState.PURGED:
        drop_item(conn, case.id)
        return
    key = _case_key(conn, keyring, case.id)
    conn.execute(
        "UPDATE cases SET state=?, next_run=?, target=?, meta=?, failures=0 WHERE id=?",
        (outcome.state, next_run, updated.target, seal(key, _meta(updated), case.id.encode() + b"meta"), case.id),
    )


def _hold(conn: sqlite3.Connection, keyring: Keyring, case_id: str, state: CaseState, failures: int,
          retry_at: float) -> None:
    conn.execute("UPDATE cases SET failures=?, next_run=? WHERE id=? AND state=?", (failures, retry_at, case_id, state))


def _due_mail(conn: sqlite3.Connection, keyring: Keyring, now: float, limit: int, max_bytes: int) -> list[QueuedMail]:
    sized = conn.execute(
        "SELECT id, length(meta) + length(message) FROM outbox WHERE next_attempt <= ? ORDER BY next_attempt "
        "LIMIT ?", (now, SCAN * limit),
    ).fetchall()
    out = []
    for row_id in first_fit(sized, limit, max_bytes):
        case_id, site, kind, created, attempts, meta_blob, msg_blob = conn.execute(
            "SELECT case_id, site, kind, created, attempts, meta, message FROM outbox WHERE id=?", (row_id,)
        ).fetchone()
        key = _case_key(conn, keyring, case_id)
        aad = f"{case_id}:{row_id}".encode()
        meta = json.loads(open_sealed(key, meta_blob, aad + b"meta"))
        mail = OutgoingMail(MailKind(kind), case_id, meta["sender"], tuple(meta["recipients"]),
                            open_sealed(key, msg_blob, aad + b"msg"), meta["message_id"])
        out.append(QueuedMail(row_id, site, attempts, created, mail))
    return out


def _mail_delivered(conn: sqlite3.Connection, keyring: Keyring, item: QueuedMail, outcome: Outcome | None,
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


def _mail_deferred(conn: sqlite3.Connection, keyring: Keyring, row_id: int, next_attempt: float) -> None:
    conn.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt=? WHERE id=?", (next_attempt, row_id))


def _mail_failed(conn: sqlite3.Connection, keyring: Keyring, item: QueuedMail, outcome: Outcome | None,
                 now: float) -> None:
    """Drop the failed mail and apply the workflow's outcome for its case (reopened, staff told)."""
    add_stat(conn, item.site, now, f"{item.mail.kind}_failed")
    conn.execute("DELETE FROM outbox WHERE id=?", (item.id,))
    if outcome is not None:
        conn.execute("UPDATE cases SET state=? WHERE id=? AND state=?",
                     (outcome.state, item.mail.case_id, CaseState.ANSWERING))
        for mail in outcome.mails:
            _queue_mail(conn, keyring, item.site, mail, now)
    if not conn.execute("SELECT 1 FROM cases WHERE id=?", (item.mail.case_id,)).fetchone():
        drop_item(conn, item.mail.case_id)


def _add_stats(conn: sqlite3.Connection, keyring: Keyring, counts: dict[tuple[str, str, str], int]) -> None:
    conn.executemany("INSERT INTO stats VALUES (?,?,?,?) ON CONFLICT(site, day, name) DO UPDATE SET value = value + "
                     "excluded.value", [(*key, n) for key, n in counts.items()])


def _take_ack_slot(conn: sqlite3.Connection, keyring: Keyring, digest: bytes, hour: int, limit: int) -> bool:
    conn.execute("DELETE FROM ack_rate WHERE hour < ?", (hour,))
    row = conn.execute("SELECT n FROM ack_rate WHERE digest=? AND hour=?", (digest, hour)).fetchone()
    if row and row[0] >= limit:
        return False
    conn.execute(
        "INSERT INTO ack_rate VALUES (?,?,1) ON CONFLICT(digest, hour) DO UPDATE SET n = n + 1", (digest, hour)
    )
    return True


def _nothing(conn: sqlite3.Connection, keyring: Keyring) -> None:
    return None


def _counts_op(conn: sqlite3.Connection, keyring: Keyring) -> dict[str, Any]:
    return _counts(conn)


def _mailbox_health(conn: sqlite3.Connection, keyring: Keyring, name: str, problem: str, now: float) -> None:
    row = conn.execute("SELECT ok, problem, since, failures FROM mailbox_health WHERE name=?", (name,)).fetchone()
    failures = 0 if not problem else (row[3] + 1 if row else 1)
    since = row[2] if row and row[1] == problem else now
    conn.execute("INSERT OR REPLACE INTO mailbox_health VALUES (?,?,?,?,?)", (name, int(not problem), problem,
                                                                              since, failures))

