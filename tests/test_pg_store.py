"""The PostgreSQL store beyond the backend-neutral tests: migrations, claims shared by several nodes,
mailbox leases, the savepoints of a group commit, the master-key rotation (on both backends), and an outage
of the database."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.exceptions import InvalidTag

from careservice.crypto import Keyring
from careservice.crypto import load_master_key
from careservice.crypto import write_master_key
from careservice.model import CaseState
from careservice.model import Envelope
from careservice.model import NewMessage
from careservice.model import Outcome
from careservice.model import Source
from careservice.settings import StoreConfig
from careservice.store import Store
from careservice.store import StoreError
from careservice.store import purge
from careservice.store.pg import schema
from careservice.store.pg.tx import PgTx
from tests.postgres import Postgres
from tests.postgres import case_rows
from tests.postgres import run_sql
from tests.postgres import with_store
from tests.support import CARE
from tests.support import write_config

MESSAGE = NewMessage("ticketnest", Source.SMTP, Envelope("a@customer.example", CARE), b"Subject: x\r\n\r\nx")
RECEIVED = [CaseState.RECEIVED]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "careservice", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60)


def test_migrate_is_versioned_and_idempotent(tmp_path: Path, postgres: Postgres) -> None:
    url, keys_url = postgres.databases()
    config = with_store(write_config(tmp_path, 1), StoreConfig(url, keys_url))
    assert schema.migrate(url, schema.CASES[:1]) == (0, 1)  # a database made by an older careservice
    cases, keys = len(schema.CASES), len(schema.KEYS)
    first = cli(config, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"store.url: schema version 1 -> {cases}",
                                         f"store.keys_url: schema version 0 -> {keys}"]
    again = cli(config, "migrate")
    assert again.stdout.splitlines() == [f"store.url: schema version {cases}, current",
                                         f"store.keys_url: schema version {keys}, current"]
    status = cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"open_cases": 0' in status.stdout and '"outbound_queued": 0' in status.stdout


async def test_a_store_not_migrated_is_refused_with_the_command_to_run(tmp_path: Path, postgres: Postgres) -> None:
    url, keys_url = postgres.databases()
    store = Store(tmp_path, Keyring(b"k" * 32), backend=StoreConfig(url, keys_url))
    with pytest.raises(StoreError, match="careservice migrate"):
        await store.start(sweep=True)


async def test_nodes_claim_different_cases_and_take_over_an_expired_lease(tmp_path: Path,
                                                                           pg_store: StoreConfig) -> None:
    keyring = Keyring(b"k" * 32)
    nodes = [Store(tmp_path, keyring, backend=pg_store) for _ in range(3)]
    for node in nodes:
        await node.start(sweep=True)
        node.node = f"node-{nodes.index(node)}"  # one process here; three hosts in life
    try:
        await nodes[0].add_inbound([MESSAGE] * 30, time.time())
        now = time.time() + 1
        claimed = await asyncio.gather(*(n.due_cases(RECEIVED, now, 12, 10 ** 9, set()) for n in nodes))
        ids = [c.id for batch in claimed for c in batch]
        assert len(ids) == len(set(ids)) == 30  # each case to one node only
        assert await nodes[1].due_cases(RECEIVED, now, 50, 10 ** 9, set()) == []  # all claimed, leases running
        # node 0 dies mid-case; after its lease (lease_seconds) another node takes its cases
        later = now + pg_store.lease_seconds + 1
        taken = await nodes[1].due_cases(RECEIVED, later, 50, 10 ** 9, set())
        assert {c.id for c in taken} == {c.id for batch in claimed for c in batch}
        # applying an outcome ends the claim: the next stage is due at once, for any node
        case = taken[0]
        await nodes[1].apply(case, Outcome(CaseState.NEW, "test"), later, later)
        [again] = await nodes[2].due_cases([CaseState.NEW], later, 5, 10 ** 9, set())
        assert again.id == case.id
    finally:
        for node in nodes:
            await node.close()


async def test_one_node_at_a_time_holds_a_mailbox_lease(tmp_path: Path, pg_store: StoreConfig) -> None:
    keyring = Keyring(b"k" * 32)
    a, b = Store(tmp_path, keyring, backend=pg_store), Store(tmp_path, keyring, backend=pg_store)
    await a.start(sweep=False)
    await b.start(sweep=False)
    a.node, b.node = "a", "b"
    try:
        now = time.time()
        assert await a.take_lease("imap:box", 20, now)
        assert not await b.take_lease("imap:box", 20, now + 1)
        assert await a.take_lease("imap:box", 20, now + 10)  # renewed
        assert not await b.take_lease("imap:box", 20, now + 25)
        assert await b.take_lease("imap:box", 20, now + 31)  # a stopped renewing: b takes it
        assert not await a.take_lease("imap:box", 20, now + 32)
        await b.drop_lease("imap:box")
        assert await a.take_lease("imap:box", 20, now + 33)  # a clean stop hands it over at once
    finally:
        await a.close()
        await b.close()


async def test_orphans_of_a_crash_between_the_two_commits_are_swept(tmp_path: Path, pg_store: StoreConfig) -> None:
    store = Store(tmp_path, Keyring(b"k" * 32), backend=pg_store)
    await store.start(sweep=True)
    try:
        [kept, keyless, _] = await store.add_inbound([MESSAGE] * 3, time.time())
        run_sql(pg_store, tmp_path, "DELETE FROM cases WHERE id NOT IN "
                                    f"('{kept}', '{keyless}')")  # the key of the third: a key without rows
        with psycopg.connect(pg_store.keys_url) as conn:
            conn.execute("DELETE FROM keys WHERE id = %s", (keyless,))  # a purge whose cases commit failed
        assert case_rows(pg_store, tmp_path) == 4
        await store.sweep_orphans(time.time())
        assert case_rows(pg_store, tmp_path) == 3  # the young orphan key may be a commit in progress
        await store.sweep_orphans(time.time() + 3600)
        assert case_rows(pg_store, tmp_path) == 2  # the kept case and its key
        assert (await store.get_case(kept)) is not None
    finally:
        await store.close()


async def test_a_key_is_deleted_only_once_the_cases_database_has_committed(
        tmp_path: Path, pg_store: StoreConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that deletes an item's key and writes what it made of the item (a staff reply dropped as
    its answer is queued) must not lose the item when the process dies between the two databases'
    commits: the key deletion waits until the cases commit is done. Before, the key went in the first
    commit, and the sweep then deleted the keyless reply: the answer was lost (a kill test found it)."""
    store = Store(tmp_path, Keyring(b"k" * 32), backend=pg_store)
    await store.start(sweep=True)
    try:
        [item] = await store.add_inbound([MESSAGE], time.time())
        cases_db = psycopg.conninfo.conninfo_to_dict(pg_store.url)["dbname"]
        real_commit = psycopg.Connection.commit

        def commit(conn: psycopg.Connection[Any]) -> None:
            if conn.info.dbname == cases_db:
                raise psycopg.OperationalError("the process died here")
            real_commit(conn)

        monkeypatch.setattr(psycopg.Connection, "commit", commit)
        with pytest.raises(StoreError):
            await store.executor.call(_drop_item, item)
        monkeypatch.undo()
        await store.sweep_orphans(time.time() + 3600)
        assert (await store.get_case(item)) is not None  # neither lost nor keyless
        await store.executor.call(_drop_item, item)  # and when the cases commit succeeds, the key goes
        assert case_rows(pg_store, tmp_path) == 0
    finally:
        monkeypatch.undo()
        await store.close()


def _drop_item(tx: PgTx, keyring: Keyring, case_id: str) -> None:
    purge.drop_item(tx, case_id)  # type: ignore[arg-type]  (PgTx offers the sqlite3 calls the store uses)


def dumped_keys(postgres: Postgres, keys_url: str) -> dict[str, bytes]:
    """The wrapped case keys as a `pg_dump` of the keys database holds them: a backup."""
    dump = subprocess.run([str(postgres.bin / "pg_dump"), "--data-only", "--table=keys", "-d", keys_url],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    rows = dump.split("FROM stdin;\n", 1)[1].split("\n\\.", 1)[0].splitlines()
    return {row.split("\t")[0]: bytes.fromhex(row.split("\t")[1].removeprefix("\\\\x")) for row in rows}


async def test_rotate_master_key_rewraps_every_key_while_a_node_runs(tmp_path: Path, store_backend: StoreConfig,
                                                                     request: pytest.FixtureRequest) -> None:
    config = with_store(write_config(tmp_path, 1), store_backend)
    key_file = tmp_path / "master.key"
    write_master_key(key_file)
    old_master = Keyring(load_master_key(key_file, create=False))  # fixed: it does not follow the file
    running = Store(tmp_path / "data", Keyring.load(key_file, create=False), backend=store_backend)  # a node
    await running.start(sweep=True)
    try:
        before = await running.add_inbound([MESSAGE] * 3, time.time())
        backup = dumped_keys(request.getfixturevalue("postgres"), store_backend.keys_url) if store_backend.shared \
            else {}
        result = await asyncio.to_thread(cli, config, "rotate-master-key")
        assert result.returncode == 0, result.stderr
        [kept] = list(tmp_path.glob("master.key.old-*"))
        assert kept.stat().st_mode & 0o777 == key_file.stat().st_mode & 0o777 == 0o600
        assert kept.read_text() != key_file.read_text()
        # the node, with the old key in memory, reads every case and wraps new ones under the new key
        assert all([await running.get_case(case_id) for case_id in before])
        [after] = await running.add_inbound([MESSAGE], time.time())
        kept.unlink()  # the operator destroys the old key
        fresh = Store(tmp_path / "data", Keyring.load(key_file, create=False), backend=store_backend)
        await fresh.start(sweep=False)
        try:
            assert all([await fresh.get_case(case_id) for case_id in [*before, after]])
        finally:
            await fresh.close()
        if store_backend.shared:  # a backup taken while the cases were open opens no more
            new_only = Keyring.load(key_file, create=False)
            for case_id in before:
                old_master.unwrap(backup[case_id], f"case:{case_id}")  # the backup did hold the keys
                with pytest.raises(InvalidTag):
                    new_only.unwrap(backup[case_id], f"case:{case_id}")
    finally:
        await running.close()


class Recording(psycopg.Connection):  # type: ignore[type-arg]
    """A connection that keeps the text of every statement sent through `execute`."""

    sent: list[str]

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> psycopg.Cursor[Any]:
        self.sent = [*getattr(self, "sent", []), str(query)]
        return super().execute(query, params, **kwargs)


def _read_keys_then_count(conn: PgTx, keyring: Keyring, name: str) -> None:
    conn.execute("SELECT count(*) FROM k.keys")
    conn.execute("INSERT INTO stats VALUES ('ticketnest', 'day', ?, 1)", (name,))


def _read_a_missing_table(conn: PgTx, keyring: Keyring) -> None:
    conn.execute("SELECT 1 FROM no_such_table")


def _count_then_fail(conn: PgTx, keyring: Keyring, name: str) -> None:
    conn.execute("INSERT INTO stats VALUES ('ticketnest', 'day', ?, 1)", (name,))
    conn.execute("INSERT INTO no_such_table VALUES (1)")


def stat_names(pg_store: StoreConfig) -> list[str]:
    with psycopg.connect(pg_store.url) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM stats ORDER BY name")]


def test_a_call_of_a_group_commit_takes_a_savepoint_only_where_it_writes(pg_store: StoreConfig) -> None:
    """A database a call only reads needs no savepoint; one it writes to does, so that a failing call,
    there too, undoes only itself."""
    keyring = Keyring(b"k" * 32)
    with Recording.connect(pg_store.url) as cases, Recording.connect(pg_store.keys_url) as keys:
        tx = PgTx(cases, keys)
        assert tx.run(_read_keys_then_count, keyring, ("kept",)) is None
        assert isinstance(tx.run(_count_then_fail, keyring, ("undone",)), psycopg.errors.UndefinedTable)
        keys.commit()
        cases.commit()
        assert keys.sent == ["SELECT count(*) FROM keys"]
        assert [s.split()[0] for s in cases.sent] == ["SAVEPOINT", "INSERT", "RELEASE",
                                                       "SAVEPOINT", "INSERT", "INSERT", "ROLLBACK", "RELEASE"]
    assert stat_names(pg_store) == ["kept"]


def test_a_read_failing_where_no_savepoint_can_undo_it_fails_the_whole_transaction(pg_store: StoreConfig) -> None:
    """The database is left aborted: its COMMIT would roll back the calls before, which were told they
    succeeded. So the failure ends the transaction (PgExecutor rolls back; every call hears StoreError)."""
    keyring = Keyring(b"k" * 32)
    with psycopg.connect(pg_store.url) as cases, psycopg.connect(pg_store.keys_url) as keys:
        tx = PgTx(cases, keys)
        assert tx.run(_read_keys_then_count, keyring, ("written before",)) is None
        with pytest.raises(psycopg.errors.UndefinedTable):
            tx.run(_read_a_missing_table, keyring, ())
        cases.rollback()
