"""Scenario 7 (issue 19): one node on SQLite, one node on PostgreSQL, two and three nodes on one
PostgreSQL, in the same run: intake msg/s and full-cycle cases/s (SMTP in, forward and ack at the
relay) with the 3 KB mails of scenario 1, each node sent its share by 10 concurrent senders; daemon
and PostgreSQL CPU per case. On this machine the nodes, the database and the load generator share
the same cores, so the totals show the cost per case more than how far more hosts would carry."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.load import CustomerMails, Job, LoadResult, send
from bench.postfix import relay_sink
from bench.procstat import cpu_seconds
from bench.report import Row
from bench.servers import BenchDaemon, Server
from careservice.settings import StoreConfig
from careservice.storeadmin import migrate
from tests.postgres import Postgres, unavailable, with_store

SETUPS = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3))
QUICK_SETUPS = (("sqlite", 1), ("postgresql", 2))  # --quick stays under two minutes: each backend, and two nodes
CONCURRENCY = 10
DRAIN_TIMEOUT = 1800.0


@contextmanager
def _nodes(backend: str, count: int, relay: Server, postgres: Postgres | None) -> Iterator[list[BenchDaemon]]:
    """`count` daemons, each with its own data_dir and ports, one store and one master key."""
    with tempfile.TemporaryDirectory(prefix="careservice-nodes-") as tmp, ExitStack() as stack:
        store = StoreConfig()
        if backend == "postgresql":
            assert postgres is not None
            store = StoreConfig(*postgres.databases())
            migrate(store)
        daemons: list[BenchDaemon] = []
        for i in range(count):
            daemon = BenchDaemon(Path(tmp) / f"node{i}", relay.port)
            with_store(daemon.config, store)  # the bench config's [acknowledge] lets every case be acknowledged
            if daemons:
                shutil.copy2(daemons[0].root / "master.key", daemon.root / "master.key")
            daemons.append(stack.enter_context(daemon))
        yield daemons


def _delivered(daemons: list[BenchDaemon], kind: str) -> int:
    return sum(d.log.delivered[kind] for d in daemons)


def _drain(daemons: list[BenchDaemon], cases: int, what: str) -> None:
    """Until `cases` forwards and acks were delivered, by whichever node's worker."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while min(_delivered(daemons, "forward"), _delivered(daemons, "ack")) < cases:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {_delivered(daemons, 'forward')} forwards of {cases} after {DRAIN_TIMEOUT} s")
        time.sleep(0.05)


def _send_all(daemons: list[BenchDaemon], per_node: int, first: int) -> list[LoadResult]:
    """Each node its share at once, from its own generator."""
    results: list[LoadResult | None] = [None] * len(daemons)

    def one(i: int) -> None:
        results[i] = send(Job(daemons[i].port, CustomerMails(3_000), per_node, CONCURRENCY, 1, DRAIN_TIMEOUT,
                              first=first + i * per_node))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(daemons))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


def _postgres_cpu(postgres: Postgres | None) -> float:
    if postgres is None:
        return 0.0
    pid = int((postgres.data / "postmaster.pid").read_text().split()[0])
    return cpu_seconds(pid, tree=True)


def run(cases: int, warmup: int, log: Callable[[str], None], setups: tuple[tuple[str, int], ...] = SETUPS) -> list[Row]:
    why = unavailable()
    rows: list[Row] = []
    postgres = Postgres().start() if not why else None
    try:
        for backend, count in setups:
            case = f"3 KB c={CONCURRENCY}/node, {count} node{'s' if count > 1 else ''} on {backend}"
            if backend == "postgresql" and postgres is None:
                rows.append(Row("7 nodes", case, "careservice", None, "cases/s", note=why))
                continue
            with relay_sink() as relay, _nodes(backend, count, relay, postgres) as daemons:
                _send_all(daemons, warmup, 0)
                _drain(daemons, warmup * count, "warm-up")
                cpu0, pg0 = sum(d.cpu() for d in daemons), _postgres_cpu(postgres)
                started = time.monotonic()
                results = _send_all(daemons, cases // count, warmup * count)
                ok = sum(r.ok for r in results)
                _drain(daemons, warmup * count + ok, "full cycle")
                seconds = max(max(d.log.last.values()) for d in daemons) - started
                intake = ok / max(r.seconds for r in results)
                cpu_ms = 1000 * (sum(d.cpu() for d in daemons) - cpu0) / ok
                pg_ms = 1000 * (_postgres_cpu(postgres) - pg0) / ok
                rows.append(Row("7 nodes", case, "careservice", ok / seconds, "cases/s",
                                note=f"intake {intake:.0f} msg/s; CPU {cpu_ms:.2f} ms/case in the nodes"
                                     + (f", {pg_ms:.2f} ms/case in PostgreSQL" if postgres and backend != "sqlite"
                                        else ""),
                                extra={"cases": ok, "seconds": seconds, "intake_rate": intake, "node_cpu_ms": cpu_ms,
                                       "postgres_cpu_ms": pg_ms, "nodes": count, "backend": backend}))
                log(f"7 {case}: {ok / seconds:.0f} cases/s, intake {intake:.0f} msg/s, {cpu_ms:.2f} ms CPU/case"
                    f" + {pg_ms:.2f} ms PostgreSQL")
    finally:
        if postgres is not None:
            postgres.destroy()
    return rows
