"""WAL checkpoints run outside the commits: none inside a commit, the worker's checkpointer copies the WAL."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from careservice.store.schema import connect
from careservice.worker import WAL_CHECKPOINT_BYTES
from careservice.worker import WalCheckpointer
from tests.support import wait_for

ROW = os.urandom(3000)


def _fill(data_dir: Path, rows: int) -> None:
    """Commit `rows` rows of 3 KB, one transaction each, as the processes do."""
    conn = connect(data_dir)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS filler(b BLOB)")
        for _ in range(rows):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO filler VALUES (?)", (ROW,))
            conn.execute("COMMIT")
    finally:
        conn.close()


def test_no_commit_checkpoints_and_the_checkpointer_copies_the_wal(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    connect(data_dir).close()  # the files, as the intake creates them
    size = (data_dir / "cases.db").stat().st_size
    held = connect(data_dir)  # a second connection open: closing the filler's must not checkpoint either
    try:
        _fill(data_dir, 2 * WAL_CHECKPOINT_BYTES // 4096)  # twice SQLite's autocheckpoint threshold
        assert (data_dir / "cases.db-wal").stat().st_size > WAL_CHECKPOINT_BYTES
        assert (data_dir / "cases.db").stat().st_size == size  # nothing copied in by a commit

        checkpointer = WalCheckpointer(data_dir, min_free_bytes=0)
        checkpointer.start()
        try:
            wait_for(lambda: (data_dir / "cases.db").stat().st_size > WAL_CHECKPOINT_BYTES, what="checkpoint")
        finally:
            asyncio.run(checkpointer.stop())
    finally:
        held.close()


@pytest.mark.parametrize("above_floor", [-2**30, 2**20], ids=["below the floor", "within 1,000 pages of it"])
def test_near_the_disk_floor_every_frame_is_copied_and_the_wal_starts_over(tmp_path: Path, above_floor: int) -> None:
    """A WAL far under the 1,000-page threshold holds space twice on a nearly full disk: copied at once."""
    data_dir = tmp_path / "data"
    connect(data_dir).close()
    held = connect(data_dir)  # as the processes hold theirs: the last close would checkpoint and delete the WAL
    try:
        _fill(data_dir, 50)
        wal = (data_dir / "cases.db-wal").stat().st_size
        assert 50 * len(ROW) < wal < WAL_CHECKPOINT_BYTES

        checkpointer = WalCheckpointer(data_dir, min_free_bytes=shutil.disk_usage(data_dir).free - above_floor)
        checkpointer.start()
        try:
            wait_for(lambda: (data_dir / "cases.db").stat().st_size > 50 * len(ROW), what="checkpoint below the floor")
        finally:
            asyncio.run(checkpointer.stop())
        _fill(data_dir, 1)  # the next commit starts the WAL over: its space is free again
        assert (data_dir / "cases.db-wal").stat().st_size < wal // 10
    finally:
        held.close()
