"""How store calls become transactions: one interface, two ways of running it.

Each call is a function `fn(conn, keyring, *args)` run in its own savepoint; an `flock` on
data_dir/write.lock queues the transactions of the two processes that share the files (exclusive
for writes, shared for reads: a commit spans cases.db and keys.db, which WAL mode does not make
atomic together, so a reader must not look between the two files' commits).

- ThreadExecutor (the intake): one writer thread owns the connection and commits whatever is waiting
  as one transaction (group commit), resolving the callers' futures only once the commit is on disk,
  so the event loop keeps answering SMTP meanwhile. Its commits do not sync under the lock: it syncs
  both WALs after releasing it (see _sync_wals), so the worker's transactions need not wait for the
  disk.
- InlineExecutor (the worker): the calls made in one turn of the caller's loop run in its thread,
  reads in one snapshot and writes in one transaction. The worker has no listener to keep
  responsive, and with a writer thread its transactions waited for the GIL between statements while
  holding the write lock, so the intake's commits waited too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careservice.crypto import Keyring
from careservice.store.keys import remembering
from careservice.store.schema import StoreError, checkpoint, connect

MAX_BATCH = 256


@dataclass
class _Op:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    checkpoint: bool
    write: bool
    future: asyncio.Future[Any]  # the caller's, resolved once the COMMIT is durable
    loop: asyncio.AbstractEventLoop


class Executor:
    """Runs store calls as transactions; `await start()`, then `await call(...)`, then `await close()`."""

    syncs_after_commit = False  # durable: COMMIT syncs (synchronous=FULL), or the executor does after it

    def __init__(self, data_dir: Path, keyring: Keyring, durable: bool) -> None:
        self.data_dir = data_dir
        self.keyring = keyring
        self.durable = durable
        self._write_lock = -1

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Close; a call from then on raises StoreError (a task left over at shutdown must not wait for
        a connection that is gone)."""
        raise NotImplementedError

    def submit(self, op: _Op) -> None:
        raise NotImplementedError

    @property
    def open(self) -> bool:
        raise NotImplementedError

    async def call(self, fn: Callable[..., Any], *args: Any, checkpoint: bool = False, write: bool = True) -> Any:
        if not self.open:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        op = _Op(fn, args, checkpoint, write, loop.create_future(), loop)
        self.submit(op)
        return await op.future

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A call that only reads: it runs in a snapshot under the shared lock, beside other readers."""
        return await self.call(fn, *args, write=False)

    def _open(self) -> sqlite3.Connection:
        conn = connect(self.data_dir, durable=self.durable, sync_commits=self.durable and not self.syncs_after_commit)
        self._write_lock = os.open(self.data_dir / "write.lock", os.O_RDWR | os.O_CREAT, 0o600)
        return conn

    def _shut(self, conn: sqlite3.Connection) -> None:
        checkpoint(conn)
        conn.close()
        os.close(self._write_lock)

    def _locked_transaction(self, conn: sqlite3.Connection, ops: list[_Op], write: bool,
                            truncate: bool) -> list[Any]:
        results: list[Any] = []
        # a savepoint each only where one failing call could undo another's writes: a write alone fails with
        # its transaction, and reads leave nothing to undo (two statements less per call)
        isolated = write and len(ops) > 1
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            with remembering():
                for op in ops:
                    if isolated:
                        conn.execute("SAVEPOINT op")
                    try:
                        results.append(op.fn(conn, self.keyring, *op.args))
                        if isolated:
                            conn.execute("RELEASE op")
                    except Exception as exc:  # one failing call must not undo the others
                        if isolated:
                            conn.execute("ROLLBACK TO op")
                            conn.execute("RELEASE op")
                        elif write:
                            conn.execute("ROLLBACK")
                        results.append(exc if isinstance(exc, StoreError) else StoreError(type(exc).__name__))
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [StoreError(f"commit failed: {exc.sqlite_errorname}")] * len(ops)
        else:
            if truncate:
                checkpoint(conn)
        return results


class ThreadExecutor(Executor):
    """A writer thread that owns the connection and commits what is waiting together."""

    syncs_after_commit = True  # _sync_wals, outside write.lock

    def __init__(self, data_dir: Path, keyring: Keyring, durable: bool) -> None:
        super().__init__(data_dir, keyring, durable)
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._wals: list[int] = []  # fds of cases.db-wal and keys.db-wal, synced after each write

    def _open(self) -> sqlite3.Connection:
        """Durable: the commits themselves do not sync (syncs_after_commit), _sync_wals does, outside the lock."""
        conn = super()._open()
        if not self.durable:
            return conn
        try:
            # the connection has the WALs open, so no other process can delete them (SQLite deletes a
            # WAL only at the last connection's close): these are the files SQLite writes our commits to
            for name in ("cases.db-wal", "keys.db-wal"):
                self._wals.append(os.open(self.data_dir / name, os.O_RDONLY))
            fd = os.open(self.data_dir, os.O_RDONLY)  # the WALs' directory entries (new files at a first start)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self._shut(conn)
            raise
        return conn

    def _shut(self, conn: sqlite3.Connection) -> None:
        super()._shut(conn)
        for fd in self._wals:
            os.close(fd)
        self._wals = []

    def _sync_wals(self) -> None:
        """Put the commits made so far on disk, as synchronous=FULL would have inside COMMIT.

        Whatever happened to a WAL since our COMMIT, the commit is then durable: frames another process
        appended meanwhile are synced with ours; a checkpoint copies only synced frames (it syncs the WAL
        first) and syncs the database before it marks them copied; and SQLite starts a WAL over (TRUNCATE
        or restart, writing over our frames) only once every frame is copied, i.e. ours are in the synced
        database. A sync that fails leaves the commit visible but not known durable: its callers hear a
        StoreError (no 250), as they would from COMMIT.

        The worker may see (and forward) a case in the moment between COMMIT and its sync. That moment
        existed before, between COMMIT and the 250 (a sender without a 250 sends again: the case comes
        twice); a power loss in it can now also lose the stored copy, whose sender had no 250 either."""
        for fd in self._wals:
            os.fdatasync(fd)

    @property
    def open(self) -> bool:
        return self._thread is not None

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="careservice-store", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._open_error is not None:
            self._thread = None
            raise StoreError(f"cannot open store in {self.data_dir}: {self._open_error}")

    async def close(self) -> None:
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._queue.put(None)
            await asyncio.to_thread(thread.join)

    def submit(self, op: _Op) -> None:
        self._queue.put(op)

    def _run(self) -> None:
        try:
            conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        while not stopping:
            batch, stopping = next_batch(self._queue)
            if batch:
                self._commit_batch(conn, batch)
        self._shut(conn)

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        for ops, write in _reads_then_writes(batch):
            fcntl.flock(self._write_lock, _lock_mode(write))
            try:
                results = self._locked_transaction(conn, ops, write, any(op.checkpoint for op in ops))
            finally:
                fcntl.flock(self._write_lock, fcntl.LOCK_UN)
            if write:
                try:
                    self._sync_wals()
                except OSError as exc:
                    results = [StoreError(f"sync failed: {exc.strerror}")] * len(ops)
            _hand_back(ops, results)


class InlineExecutor(Executor):
    """The caller's thread: the calls of one loop turn commit together."""

    def __init__(self, data_dir: Path, keyring: Keyring, durable: bool) -> None:
        super().__init__(data_dir, keyring, durable)
        self.conn: sqlite3.Connection | None = None
        self._turn = asyncio.Lock()  # one transaction at a time (the flock is per process)
        self._pending: list[_Op] = []  # the calls of this loop turn, committed together
        self._committing: set[asyncio.Future[None]] = set()
        self._truncation: asyncio.Future[None] | None = None  # the WAL truncation purges wait for

    @property
    def open(self) -> bool:
        return self.conn is not None

    async def start(self) -> None:
        try:
            self.conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store in {self.data_dir}: {exc}") from None

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            if self._truncation is not None:
                self._truncation.cancel()  # closing truncates the WAL anyway
            self._shut(conn)

    def submit(self, op: _Op) -> None:
        if not self._pending:
            op.loop.call_soon(self._commit_pending)
        self._pending.append(op)

    def _commit_pending(self) -> None:
        """Commit the calls of the loop turn that just ended."""
        batch, self._pending = self._pending, []
        for ops, write in _reads_then_writes(batch):
            task = asyncio.ensure_future(self._inline(ops, write))
            self._committing.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._committing.discard)

    async def _inline(self, ops: list[_Op], write: bool) -> None:
        """Run `ops` as one transaction in this thread; purges then wait for a WAL truncation."""
        try:
            async with self._holding(write):
                if self.conn is None:
                    raise StoreError("the store is closed")
                conn = self.conn
                results = self._locked_transaction(conn, ops, write, truncate=False)
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
        several relay connections at once, and a truncation each would cost one per answer."""
        if self._truncation is None or self._truncation.done():  # done: it failed before it began
            self._truncation = asyncio.ensure_future(self._truncate_soon(conn))
        await asyncio.shield(self._truncation)

    async def _truncate_soon(self, conn: sqlite3.Connection) -> None:
        await asyncio.sleep(0)  # the purges committing in this turn of the loop join this truncation
        async with self._holding(write=True):
            self._truncation = None  # a purge committed from now on needs the next one
            checkpoint(conn)

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


def next_batch(waiting: queue.SimpleQueue[_Op | None]) -> tuple[list[_Op], bool]:
    """The calls waiting now (blocking for the first), at most MAX_BATCH; and whether a stop (None) came."""
    batch: list[_Op] = []
    while len(batch) < MAX_BATCH:
        try:
            op = waiting.get() if not batch else waiting.get_nowait()
        except queue.Empty:
            break
        if op is None:
            return batch, True
        batch.append(op)
    return batch, False


def _reads_then_writes(batch: list[_Op]) -> Iterator[tuple[list[_Op], bool]]:
    """A batch as its reads (one snapshot under the shared lock), then its writes (one transaction)."""
    for write in (False, True):
        ops = [op for op in batch if op.write is write]
        if ops:
            yield ops, write


def _lock_mode(write: bool) -> int:
    """Writers take the lock exclusively (the kernel queues the two processes; SQLite's own busy wait
    sleeps); readers share it."""
    return fcntl.LOCK_EX if write else fcntl.LOCK_SH


def _hand_back(ops: list[_Op], results: list[Any]) -> None:
    """The results of one transaction, to each caller's loop in one callback: one wake-up of the loop
    (a write to its self-pipe) per group commit, not one per message."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for op, result in zip(ops, results, strict=True):
        by_loop.setdefault(op.loop, []).append((op.future, result))
    for loop, resolved in by_loop.items():
        loop.call_soon_threadsafe(_resolve_all, resolved)


def _resolve_all(resolved: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in resolved:
        _resolve(future, result)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.cancelled():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
