"""What the durable intake goal stands against: the two rows of scenario 1 that bound it from below.

DurableSink: the simplest durable SMTP intake in Python, as the machine's ceilings measured it before
careservice existed: aiosmtpd hands each message to one writer thread, which inserts whatever is
waiting into SQLite (WAL, synchronous=FULL) as one transaction and answers 250 only after COMMIT.
No encryption, no parsing, no limits, no second process: a design with less work than any durable
intake can do, so its ratio to bare aiosmtpd is the most a durable one can reach here.

paused_worker: careservice with its worker processes stopped (SIGSTOP) for the measured runs, so the
intake runs alone: its own ceiling, without the worker's CPU and commits beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from aiosmtpd.smtp import SMTP

from bench.load import WORKER_CONTEXT
from bench.procstat import family
from bench.servers import START_TIMEOUT, BenchDaemon, Server, run_loop, serve_until_term
from tests.support import free_port

BATCH = 256


def open_mail_db(path: Path) -> sqlite3.Connection:
    """The floor's one table, in WAL mode, committing with synchronous=FULL (bench.cyclefloor's relay
    process deletes from it too, hence the busy timeout)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS mail(id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    return conn


class PlainStore:
    """The floor's storage: each message's bytes as they came, in one table (bench.workfloor adds the product's
    sealing). prepare runs in the event loop, open and insert in the writer thread."""

    def open(self, path: Path) -> sqlite3.Connection:
        return open_mail_db(path)

    def prepare(self, content: bytes) -> Any:
        return content

    def insert(self, conn: sqlite3.Connection, items: list[Any]) -> None:
        conn.executemany("INSERT INTO mail(body) VALUES (?)", [(body,) for body in items])


def _write(path: Path, store: PlainStore, waiting: queue.SimpleQueue[tuple[Any, asyncio.Future[None]] | None],
           loop: asyncio.AbstractEventLoop) -> None:
    conn = store.open(path)
    while (first := waiting.get()) is not None:
        batch = [first]
        while len(batch) < BATCH:
            try:
                item = waiting.get_nowait()
            except queue.Empty:
                break
            if item is None:
                waiting.put(None)  # the stop comes after this batch
                break
            batch.append(item)
        conn.execute("BEGIN")
        store.insert(conn, [item for item, _ in batch])
        conn.execute("COMMIT")
        loop.call_soon_threadsafe(_resolve_all, [future for _, future in batch])
    conn.close()


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class _DurableHandler:
    def __init__(self, store: PlainStore, waiting: queue.SimpleQueue[tuple[Any, asyncio.Future[None]] | None]) -> None:
        self.store = store
        self.waiting = waiting

    async def handle_DATA(self, server: SMTP, session: object, envelope: Any) -> str:
        done = asyncio.get_running_loop().create_future()
        self.waiting.put((self.store.prepare(envelope.original_content), done))
        await done
        return "250 2.0.0 stored"


def serve_durable(port: int, path: Path, ready: Any, uvloop: bool, store: PlainStore | None = None) -> None:
    store = store or PlainStore()

    async def main() -> None:
        waiting: queue.SimpleQueue[tuple[Any, asyncio.Future[None]] | None] = queue.SimpleQueue()
        writer = threading.Thread(target=_write, args=(path, store, waiting, asyncio.get_running_loop()))
        writer.start()
        await serve_until_term(_DurableHandler(store, waiting), "floor.bench.localhost", port, ready)
        waiting.put(None)
        await asyncio.to_thread(writer.join)

    run_loop(main(), uvloop)


class DurableSink(Server):
    """aiosmtpd + SQLite group commit in its own process (see the module's docstring), on either loop."""

    def __init__(self, uvloop: bool = False) -> None:
        self.uvloop = uvloop
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="careservice-bench-floor-"))
        self._proc: Any = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def process(self, ready: Any) -> Any:
        """The server's process, not yet started; it sets `ready` once it listens."""
        return WORKER_CONTEXT.Process(target=serve_durable, daemon=True,
                                      args=(self.port, self._dir / "mail.db", ready, self.uvloop))

    def start(self) -> Self:
        ready = WORKER_CONTEXT.Event()
        self._proc = self.process(ready)
        self._proc.start()
        if not ready.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(10)
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def paused_worker(daemon: BenchDaemon) -> Iterator[None]:
    """The daemon's worker processes stopped while the block runs, and continued after it.

    A worker stopped inside a transaction would hold data_dir/write.lock and stall the intake: stop
    it only while the lock is free (bounded tries), and let it go on otherwise."""
    workers = [pid for pid in family(daemon.pid) if pid != daemon.pid]
    if not workers:
        raise RuntimeError("the daemon has no worker process to pause")
    lock = os.open(daemon.data_dir / "write.lock", os.O_RDWR)
    try:
        for _ in range(200):
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a worker held it (or the intake committed): try again
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
                time.sleep(0.01)
                continue
            fcntl.flock(lock, fcntl.LOCK_UN)
            break
        else:
            raise RuntimeError("the store's write lock stayed busy: the worker could not be paused")
        try:
            yield
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
    finally:
        os.close(lock)
