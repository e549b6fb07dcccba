"""A throwaway PostgreSQL for the tests: initdb in a temp dir, a Unix socket there, no TCP, fsync off.

Debian's `postgresql` package (binaries in /usr/lib/postgresql/<version>/bin). initdb refuses to run
as root, so as root the server runs as the `postgres` user; the temp dir is made reachable for it.
Each test gets its own pair of databases (cases, keys), owned by two roles, migrated by
`careservice migrate` as an operator would.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import tomllib
from pathlib import Path

import psycopg

from careservice.settings import StoreConfig
from tests.reliability.helpers import set_keys

ROOT = Path("/usr/lib/postgresql")


def binaries() -> Path | None:
    versions = sorted((p for p in ROOT.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return versions[-1] if versions else None


def unavailable() -> str:
    """Why no throwaway server can run here ("" when it can)."""
    if binaries() is None:
        return f"no PostgreSQL server binaries under {ROOT} (Debian package `postgresql`)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run initdb as"
    return ""


class Postgres:
    """One server; `start()`, `stop()` (fast, for outage tests: `start()` again keeps the data), `destroy()`."""

    def __init__(self) -> None:
        bin_dir = binaries()
        assert bin_dir is not None, unavailable()
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="careservice-pg-"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._names = itertools.count(1)
        if self.user:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "app", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=60)

    def start(self) -> Postgres:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "30", "-o",
                  f"-k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=200", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = "app") -> str:
        return f"postgresql://{user}@/{database}?host={self.dir}"

    def databases(self) -> tuple[str, str]:
        """A fresh (url, keys_url) pair: two databases, each owned by its own role."""
        n = next(self._names)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            for part in ("cases", "keys"):
                conn.execute(f"CREATE ROLE care_{part}_{n} LOGIN")
                conn.execute(f"CREATE DATABASE care_{part}_{n} OWNER care_{part}_{n}")
        return self.url(f"care_cases_{n}", f"care_cases_{n}"), self.url(f"care_keys_{n}", f"care_keys_{n}")


def rows_containing(store: StoreConfig, needles: list[bytes]) -> dict[str, int]:
    """Per database ("cases", "keys"): how many rows of any table hold one of `needles` in their text form
    (bytea as hex, so a needle is looked for as it is and hex-encoded); databases with none are left out."""
    found: dict[str, int] = {}
    for name, url in (("cases", store.url), ("keys", store.keys_url)):
        with psycopg.connect(url) as conn:
            tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            patterns = [p for n in needles for p in (f"%{n.decode()}%", f"%{n.hex()}%")]
            n = sum(conn.execute(f'SELECT count(*) FROM "{t}" r WHERE r::text LIKE ANY(%s)', (patterns,)).fetchone()[0]
                    for t in tables)
        if n:
            found[name] = n
    return found


def with_store(config: Path, store: StoreConfig) -> Path:
    """Point a config written by tests.support.write_config at `store` (unchanged for SQLite), its relay
    timeout below the store's lease (the tests' leases are short; check refuses a lease a send outlasts)."""
    if store.shared:
        timeout = tomllib.loads(config.read_text())["relay"].get("timeout", 60)
        set_keys(config, "relay", timeout=min(timeout, store.lease_seconds - 1))
        with config.open("a") as f:
            f.write(f'\n[store]\nurl = "{store.url}"\nkeys_url = "{store.keys_url}"\n'
                    f"lease_seconds = {store.lease_seconds}\n")
    return config


def run_sql(store: StoreConfig, data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    """One statement on the cases database (SQLite's cases.db, or PostgreSQL's), committed; its rows."""
    if store.shared:
        with psycopg.connect(store.url) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []
    conn = sqlite3.connect(data_dir / "cases.db", timeout=10)
    try:
        with conn:
            return conn.execute(sql).fetchall()
    finally:
        conn.close()


def case_rows(store: StoreConfig, data_dir: Path) -> int:
    """Rows that belong to some case, in either database: cases, queued mail, case keys."""
    if store.shared:
        with psycopg.connect(store.keys_url) as conn:
            keys = conn.execute("SELECT count(*) FROM keys").fetchone()[0]
    else:
        conn = sqlite3.connect(data_dir / "keys.db", timeout=10)
        keys = conn.execute("SELECT count(*) FROM keys").fetchone()[0]
        conn.close()
    return keys + sum(run_sql(store, data_dir, f"SELECT count(*) FROM {t}")[0][0] for t in ("cases", "outbox"))
