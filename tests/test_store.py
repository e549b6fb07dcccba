"""The store against real SQLite files: sealing, purging, two processes, inline transactions."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from careservice.crypto import Keyring
from careservice.model import CaseState
from careservice.model import Envelope
from careservice.model import NewMessage
from careservice.model import Outcome
from careservice.model import Source
from careservice.settings import StoreConfig
from careservice.store import Store
from careservice.store import StoreError
from careservice.store.keys import case_key
from careservice.store.purge import purge_case
from careservice.store.tallies import take_ack_slots
from tests.postgres import rows_containing
from tests.support import CARE
from tests.support import customer_mail
from tests.support import files_containing

MESSAGE = NewMessage("ticketnest", Source.SMTP, Envelope("a@customer.example", CARE), b"Subject: x\r\n\r\nx")
STATES = [CaseState.RECEIVED]


async def test_a_message_taken_before_is_a_duplicate_within_one_commit_and_after_it(
        tmp_path: Path, store_backend: StoreConfig) -> None:
    store = Store(tmp_path, Keyring(b"k" * 32), backend=store_backend)
    await store.start(sweep=True)
    try:
        again = replace(MESSAGE, dedupe=b"d" * 32)
        first, second = await store.add_inbound([again, again], time.time())
        [third] = await store.add_inbound([again], time.time())
        assert first != "" and second == third == ""
        assert (await store.counts())["inbound_pending"] == 1
    finally:
        await store.close()


def _ack_rate(conn: sqlite3.Connection, keyring: Keyring) -> dict[tuple[bytes, int], int]:
    return {(bytes(digest), hour): n for digest, hour, n in conn.execute("SELECT digest, hour, n FROM ack_rate")}


async def test_an_acknowledgement_counts_under_every_limit_or_under_none(tmp_path: Path,
                                                                         store_backend: StoreConfig) -> None:
    store = Store(tmp_path, Keyring(b"k" * 32), backend=store_backend)
    await store.start(sweep=True)
    address, domain, other = b"a" * 32, b"d" * 32, b"o" * 32
    try:
        taken = [await store.executor.call(take_ack_slots, ((address, 2), (domain, 3)), 7) for _ in range(3)]
        assert taken == [True, True, False]  # the address's limit is used up: the domain's count stays
        assert await store.executor.read(_ack_rate) == {(address, 7): 2, (domain, 7): 2}
        assert await store.executor.call(take_ack_slots, ((other, 5), (domain, 3)), 7) is True
        assert await store.executor.call(take_ack_slots, ((other, 5), (domain, 3)), 7) is False
        assert await store.executor.call(take_ack_slots, ((address, 2),), 8) is True  # a new hour
        assert await store.executor.call(take_ack_slots, ((other, 5), (other, 5)), 9) is True  # counted once
        assert await store.executor.read(_ack_rate) == {(address, 7): 2, (domain, 7): 3, (other, 7): 1,
                                                        (address, 8): 1, (other, 9): 1}
    finally:
        await store.close()


async def test_store_seals_everything_and_purge_shreds_the_key(tmp_path: Path, store_backend: StoreConfig) -> None:
    store = Store(tmp_path, Keyring(b"k" * 32), backend=store_backend)
    await store.start(sweep=True)
    try:
        raw = customer_mail("Zebra subject", "quokka body", sender="marker@customer.example")
        await store.add_inbound([NewMessage("ticketnest", Source.SMTP, Envelope("marker@customer.example", CARE),
                                            raw)], time.time())
        [case] = await store.due_cases(STATES, time.time(), 10, 10 ** 9, set())
        markers = [b"marker@customer", b"Zebra", b"quokka"]
        assert files_containing(tmp_path, markers) == []
        if store_backend.shared:
            assert rows_containing(store_backend, [case.id.encode(), *markers]) == {"cases": 1, "keys": 1}
        await store.apply(case, Outcome(CaseState.PURGED, "test"), time.time(), time.time())
        if store_backend.shared:
            assert rows_containing(store_backend, [case.id.encode()]) == {}
        else:
            keys = sqlite3.connect(tmp_path / "keys.db")
            assert keys.execute("SELECT count(*) FROM keys").fetchone()[0] == 0
            keys.close()
        assert (await store.counts())["inbound_pending"] == 0
    finally:
        await store.close()


async def test_reader_never_sees_a_case_without_its_key(tmp_path: Path, store_backend: StoreConfig) -> None:
    """The two databases commit one after the other; another process's reads must not fall between."""
    keyring = Keyring(b"k" * 32)
    writer = Store(tmp_path, keyring, backend=store_backend)
    reader = Store(tmp_path, keyring, durable=False, inline=True, backend=store_backend)
    await writer.start(sweep=True)
    await reader.start(sweep=False)

    async def write() -> None:
        for _ in range(200):
            await writer.add_inbound([MESSAGE], time.time())

    async def read() -> int:
        seen: set[str] = set()  # on PostgreSQL a case is claimed once: count the distinct ones
        while len(seen) < 200:
            seen.update(c.id for c in await reader.due_cases([CaseState.RECEIVED], time.time() + 1, 500, 10 ** 9,
                                                              seen))
        return len(seen)

    try:
        assert await asyncio.wait_for(asyncio.gather(write(), read()), 60) == [None, 200]
    finally:
        await writer.close()
        await reader.close()


@pytest.mark.parametrize("inline", [False, True], ids=["threaded", "inline"])
async def test_reader_never_sees_a_case_without_its_key_sqlite(tmp_path: Path, inline: bool) -> None:
    """SQLite's two ways of running calls, the threaded one beside the other process's inline one."""
    keyring = Keyring(b"k" * 32)
    writer, reader = Store(tmp_path, keyring), Store(tmp_path, keyring, durable=False, inline=inline)
    await writer.start(sweep=True)
    await reader.start(sweep=False)
    try:
        for _ in range(50):
            await writer.add_inbound([MESSAGE], time.time())
            await reader.due_cases([CaseState.RECEIVED], time.time() + 1, 500, 10 ** 9, set())
        assert len(await reader.due_cases([CaseState.RECEIVED], time.time() + 1, 500, 10 ** 9, set())) == 50
    finally:
        await writer.close()
        await reader.close()


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """The intake's store and the worker's inline one over the same files, as the two processes have them."""
    keyring = Keyring(b"k" * 32)
    intake, worker = Store(tmp_path, keyring), Store(tmp_path, keyring, durable=False, inline=True)
    await intake.start(sweep=True)
    await worker.start(sweep=False)
    yield intake, worker
    await worker.close()
    await intake.close()


def wal_sizes(data_dir: Path) -> list[int]:
    return [(data_dir / f"{db}.db-wal").stat().st_size for db in ("cases", "keys")]


async def test_inline_store_waits_for_the_other_process_without_stopping_its_loop(
        tmp_path: Path, stores: tuple[Store, Store]) -> None:
    """The worker's store runs in its loop; a write lock held elsewhere must not freeze that loop."""
    _, worker = stores
    other = os.open(tmp_path / "write.lock", os.O_RDWR)  # its own open file: conflicts as another process's
    fcntl.flock(other, fcntl.LOCK_EX)
    safety = threading.Timer(3.0, fcntl.flock, (other, fcntl.LOCK_UN))  # a frozen loop would wait for this
    safety.start()
    try:
        call = asyncio.create_task(worker.counts())
        started = time.monotonic()
        await asyncio.sleep(0.3)
        assert time.monotonic() - started < 1.5, "the loop stopped while the lock was held elsewhere"
        assert not call.done()
        fcntl.flock(other, fcntl.LOCK_UN)
        assert (await asyncio.wait_for(call, 5))["inbound_pending"] == 0
    finally:
        safety.cancel()
        os.close(other)


@pytest.mark.parametrize("inline", [False, True], ids=["threaded", "inline"])
async def test_a_call_after_close_fails_at_once(tmp_path: Path, inline: bool, store_backend: StoreConfig) -> None:
    """A task left over at shutdown must get an error, not wait forever (that kept stopped workers alive)."""
    first = Store(tmp_path, Keyring(b"k" * 32), backend=store_backend)
    await first.start(sweep=True)
    await first.close()
    store = Store(tmp_path, Keyring(b"k" * 32), durable=not inline, inline=inline, backend=store_backend)
    await store.start(sweep=False)
    await store.close()
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.counts(), 5)


async def test_concurrent_purges_return_only_once_the_wal_is_truncated(tmp_path: Path,
                                                                        stores: tuple[Store, Store]) -> None:
    """The inline store shares one WAL truncation among purges of one loop turn; none returns before it."""
    intake, worker = stores
    for _ in range(3):
        await intake.add_inbound([MESSAGE] * 5, time.time())
        assert (tmp_path / "cases.db-wal").stat().st_size > 0
        await asyncio.gather(*(worker.purge_older_than(0.0, frozenset(), time.time()) for _ in range(4)))
        assert wal_sizes(tmp_path) == [0, 0]
        await intake.add_inbound([MESSAGE], time.time())
        await worker.purge_older_than(0.0, frozenset(), time.time())  # alone: it must not return before its truncation
        assert wal_sizes(tmp_path) == [0, 0]


async def test_inline_calls_of_one_loop_turn_commit_together_each_in_its_own_savepoint(
        stores: tuple[Store, Store]) -> None:
    """The worker's calls made in one loop turn share a transaction; one failing call undoes only itself."""
    intake, worker = stores
    await intake.add_inbound([MESSAGE] * 3, time.time())
    cases = await worker.due_cases([CaseState.RECEIVED], time.time() + 1, 10, 10 ** 9, set())
    assert len(cases) == 3
    commits: list[str] = []
    conn = worker.executor.conn  # type: ignore[attr-defined]
    assert conn is not None
    conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    now = time.time()
    opened = Outcome(CaseState.OPEN, "test")
    results = await asyncio.gather(
        *(worker.apply(case, opened, now, now + 3600) for case in cases),
        worker.apply(cases[0], opened, now, now + 3600),  # cases[0] is no longer RECEIVED: refused
        return_exceptions=True,
    )
    conn.set_trace_callback(None)
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], StoreError)
    assert commits == ["COMMIT"]
    assert (await worker.counts())["open_cases"] == 3


def _add_stat_then_fail(conn: sqlite3.Connection, keyring: Keyring, name: str) -> None:
    conn.execute("INSERT INTO stats VALUES ('ticketnest', 'day', ?, 1)", (name,))
    if name == "fails":
        raise ValueError(name)


@pytest.mark.parametrize("store_kind", ["inline", "thread"])
async def test_a_call_alone_commits_or_rolls_back_whole_without_a_savepoint(stores: tuple[Store, Store],
                                                                           store_kind: str) -> None:
    """A transaction of one call needs no savepoint: its failure rolls back what it wrote, and the
    store goes on."""
    store = stores[0] if store_kind == "thread" else stores[1]
    statements: list[str] = []
    if store_kind == "inline":  # the writer thread's connection is that thread's alone
        store.executor.conn.set_trace_callback(statements.append)  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="ValueError"):
        await store.executor.call(_add_stat_then_fail, "fails")
    await store.executor.call(_add_stat_then_fail, "kept")
    rows = await store.executor.read(lambda conn, keyring: conn.execute("SELECT name FROM stats").fetchall())
    assert rows == [("kept",)]
    if store_kind == "inline":
        assert [s.split()[0] for s in statements if not s.startswith("INSERT")] == [
            "BEGIN", "ROLLBACK", "BEGIN", "COMMIT", "BEGIN", "SELECT", "COMMIT"]


def _key_twice_purge_key(conn: sqlite3.Connection, keyring: Keyring, case_id: str) -> str:
    """What case_key gives after the purge (asserting here would escape the executor as a BaseException)."""
    if case_key(conn, keyring, case_id) != case_key(conn, keyring, case_id):
        return "two keys"
    purge_case(conn, case_id)
    try:
        case_key(conn, keyring, case_id)
    except StoreError:
        return "purged"
    return "the purged key"


async def test_a_case_key_is_unwrapped_once_a_transaction_and_forgotten_with_it_or_its_purge(
        tmp_path: Path, store_backend: StoreConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = Keyring(b"k" * 32)
    unwrapped: list[str] = []
    unwrap = keyring.unwrap
    monkeypatch.setattr(keyring, "unwrap", lambda wrapped, label: (  # case keys only, not the day's secret
        unwrapped.append(label) if label.startswith("case:") else None) or unwrap(wrapped, label))
    store = Store(tmp_path, keyring, backend=store_backend)
    await store.start(sweep=False)
    try:
        kept, purged = await store.add_inbound([MESSAGE] * 2, time.time())
        assert await store.executor.call(lambda conn, keyring: case_key(conn, keyring, kept) == case_key(
            conn, keyring, kept)) is True
        assert unwrapped == [f"case:{kept}"]
        assert await store.executor.call(case_key, kept)  # the next transaction reads it again
        assert unwrapped == [f"case:{kept}"] * 2
        assert await store.executor.call(_key_twice_purge_key, purged) == "purged"
        assert unwrapped[2:] == [f"case:{purged}"]  # once before its purge; after it, no key is found
    finally:
        await store.close()


async def test_a_start_drops_rows_without_a_key_and_keys_without_rows(tmp_path: Path) -> None:
    """What a process killed between the two files' commits left, the next start sweeps (SQLite)."""
    keyring = Keyring(b"k" * 32)
    store = Store(tmp_path, keyring)
    await store.start(sweep=True)
    try:
        kept, keyless, rowless = await store.add_inbound([MESSAGE, MESSAGE, MESSAGE], time.time())
    finally:
        await store.close()
    cases = sqlite3.connect(tmp_path / "cases.db", isolation_level=None)
    try:
        cases.execute("DELETE FROM cases WHERE id=?", (rowless,))
        cases.execute("INSERT INTO outbox(case_id, site, kind, created, next_attempt, meta, message) "
                      "VALUES (?, 'ticketnest', 'ack', 0, 0, x'00', x'00')", (keyless,))
        cases.execute("ATTACH DATABASE ? AS k", (str(tmp_path / "keys.db"),))
        cases.execute("DELETE FROM k.keys WHERE id=?", (keyless,))
    finally:
        cases.close()
    await store.start(sweep=True)
    await store.close()
    cases = sqlite3.connect(tmp_path / "cases.db")
    try:
        cases.execute("ATTACH DATABASE ? AS k", (str(tmp_path / "keys.db"),))
        assert [r[0] for r in cases.execute("SELECT id FROM cases")] == [kept]
        assert cases.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
        assert [r[0] for r in cases.execute("SELECT id FROM k.keys")] == [kept]
    finally:
        cases.close()


async def test_the_intake_answers_only_once_both_wals_are_synced_after_the_write_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit is acknowledged only once both WALs holding it are synced, and they sync outside
    write.lock (the worker's transactions do not wait for the disk). Each sync waits here until the
    test has seen that the caller is still waiting."""
    store = Store(tmp_path, Keyring(b"k" * 32))
    await store.start(sweep=True)
    wals = [os.stat(tmp_path / name).st_ino for name in ("cases.db-wal", "keys.db-wal")]
    real_sync = os.fdatasync
    synced: list[tuple[int, int, int, bool]] = []  # (inode, cases, keys, write.lock free) at each sync
    entered, release = threading.Event(), threading.Event()

    def sync(fd: int) -> None:
        look = sqlite3.connect(tmp_path / "cases.db")  # committed, as another process sees it
        try:
            look.execute("ATTACH DATABASE ? AS k", (str(tmp_path / "keys.db"),))
            cases, = look.execute("SELECT count(*) FROM cases").fetchone()
            keys, = look.execute("SELECT count(*) FROM k.keys").fetchone()
        finally:
            look.close()
        lock = os.open(tmp_path / "write.lock", os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the store still held it
            free = True
        except BlockingIOError:
            free = False
        finally:
            os.close(lock)
        synced.append((os.fstat(fd).st_ino, cases, keys, free))
        entered.set()
        release.wait(5)
        real_sync(fd)
        entered.clear()

    monkeypatch.setattr(os, "fdatasync", sync)
    try:
        call = asyncio.create_task(store.add_inbound([MESSAGE], time.time()))
        assert await asyncio.to_thread(entered.wait, 5), "the commit was not synced by the store"
        await asyncio.sleep(0.2)
        assert not call.done(), "acknowledged before the WAL was synced"
        release.set()
        assert len(await asyncio.wait_for(call, 5)) == 1
    finally:
        release.set()
        monkeypatch.undo()
        await store.close()
    assert sorted(synced) == sorted((wal, 1, 1, True) for wal in wals)
