"""How store calls become transactions on PostgreSQL: a thread with a pool per database, group commit.

Both processes of a node use it (the intake and the worker): the calls waiting when the thread
comes round commit as one transaction (see careservice.store.executor for the SQLite twins), and
the callers' futures resolve only after COMMIT, so a 250 still follows a commit. The pools
reconnect by themselves: while PostgreSQL is away each call fails fast with StoreError (the intake
answers 451, the form "try again shortly", the worker retries), and the node goes on when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from careservice.crypto import Keyring
from careservice.store.executor import _Op, _resolve, next_batch
from careservice.store.keys import remembering
from careservice.store.pg import schema
from careservice.store.pg.tx import PgTx
from careservice.store.schema import StoreError

log = logging.getLogger("careservice.store")
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # a warning per reconnect attempt; ours say it once
CHANNEL = "careservice"  # NOTIFY after a commit that made a case or a mail due
GET_TIMEOUT = 3.0  # seconds a call waits for a connection before it fails (the intake then answers 451)
CONNECT_TIMEOUT = 3


def pool(url: str, name: str) -> ConnectionPool:
    # no `check` on each borrow (two round trips a transaction): a connection the database dropped fails
    # one transaction (its callers hear StoreError: a 451, a retry), and the pool replaces it
    return ConnectionPool(url, min_size=1, max_size=2, open=False, name=name, timeout=GET_TIMEOUT,
                          reconnect_timeout=0,
                          kwargs={"connect_timeout": CONNECT_TIMEOUT, "application_name": f"careservice-{name}"})


class PgExecutor:
    """Runs store calls as transactions over the cases and keys databases; start, call, close."""

    def __init__(self, url: str, keys_url: str, keyring: Keyring) -> None:
        self.keyring = keyring
        self.cases_pool = pool(url, "cases")
        self.keys_pool = pool(keys_url, "keys")
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def open(self) -> bool:
        return self._thread is not None

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._open_pools)
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(f"cannot open the PostgreSQL store: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="careservice-pg", daemon=True)
        self._thread.start()

    def _open_pools(self) -> None:
        for p, migrations, key in ((self.cases_pool, schema.CASES, "url"), (self.keys_pool, schema.KEYS, "keys_url")):
            p.open(wait=True, timeout=GET_TIMEOUT * 2)
            with p.connection() as conn:
                schema.check_version(conn, migrations, key)

    async def close(self) -> None:
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._queue.put(None)
            await asyncio.to_thread(thread.join)
        await asyncio.to_thread(self._close_pools)

    def _close_pools(self) -> None:
        self.cases_pool.close()
        self.keys_pool.close()

    async def call(self, fn: Callable[..., Any], *args: Any, checkpoint: bool = False, write: bool = True) -> Any:
        """`checkpoint` and `write` are SQLite's concerns (the WAL truncation, the file lock): ignored here."""
        if not self.open:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        op = _Op(fn, args, checkpoint, write, loop.create_future(), loop)
        self._queue.put(op)
        return await op.future

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.call(fn, *args, write=False)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = next_batch(self._queue)
            results = self._transaction(batch) if batch else []
            for item, result in zip(batch, results, strict=True):
                item.loop.call_soon_threadsafe(_resolve, item.future, result)

    def _transaction(self, batch: list[_Op]) -> list[Any]:
        try:
            with self.keys_pool.connection() as keys, self.cases_pool.connection() as cases:
                return self._commit(PgTx(cases, keys, alone=len(batch) == 1), batch)
        except Exception as exc:  # whatever it was, the thread goes on and every caller hears of it
            log.error("pg_commit_failed error=%s", type(exc).__name__)
            return [StoreError(f"commit failed: {type(exc).__name__}")] * len(batch)

    def _commit(self, tx: PgTx, batch: list[_Op]) -> list[Any]:
        try:
            # each case key read once (careservice.store.keys.remembering): a key another node deletes meanwhile
            # is used on, where a later read would have failed; the calls before that read had used it anyway,
            # so either way what was written under it is keyless, and swept
            with remembering():
                results = [tx.run(op.fn, self.keyring, op.args) for op in batch]
            results = [r if not isinstance(r, Exception) or isinstance(r, StoreError) else StoreError(type(r).__name__)
                       for r in results]
            if tx.alone and isinstance(results[0], Exception):
                _rollback(tx)
                return results
            if tx.wakes:
                tx.cases.execute(f"NOTIFY {CHANNEL}")
            tx.keys.commit()  # first, and the key deletions last: see careservice.store.pg.tx
            tx.cases.commit()
            tx.delete_keys()
            return results
        except BaseException:
            _rollback(tx)
            raise


def _rollback(tx: PgTx) -> None:
    for conn in (tx.keys, tx.cases):
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
