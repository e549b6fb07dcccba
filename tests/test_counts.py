"""The counts that every metrics scrape and `careservice status` read come from indexes, not case rows.

With the rows read, a scrape cost time in proportion to the open cases, each read whole with its
sealed message: about 100 ms at 30,000 open, and all of cases.db through the page cache."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from careservice.store import read_status
from careservice.store import statsdb
from careservice.store import tallies
from careservice.store.schema import connect


def _traced(real: Callable[..., sqlite3.Connection], seen: list[str]) -> Callable[..., sqlite3.Connection]:
    def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real(*args, **kwargs)
        conn.set_trace_callback(seen.append)
        return conn

    return traced


def test_scrape_and_status_counts_read_no_case_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    connect(data_dir).close()
    seen: list[str] = []
    monkeypatch.setattr(statsdb, "connect", _traced(statsdb.connect, seen))
    monkeypatch.setattr(tallies, "connect", _traced(tallies.connect, seen))
    statsdb.live(data_dir)
    read_status(data_dir)

    queries = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT") and " cases " in f"{sql} "]
    assert len(queries) >= 4  # per-site open cases, stuck cases (both paths), open and inbound counts
    conn = connect(data_dir)
    try:
        for sql in queries:
            plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            on_cases = [step for step in plan if step.split()[1:2] == ["cases"]]
            assert on_cases and all("COVERING INDEX" in step for step in on_cases), (sql, plan)
    finally:
        conn.close()


def test_a_store_from_before_gets_the_new_indexes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    conn = connect(data_dir)
    conn.execute("DROP INDEX cases_by_state")
    conn.execute("DROP INDEX cases_stuck")
    conn.execute("CREATE INDEX cases_due ON cases(state, next_run)")  # the index of 0.x stores
    conn.close()
    conn = connect(data_dir)
    try:
        names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        conn.close()
    assert {"cases_by_state", "cases_stuck"} <= names and "cases_due" not in names
