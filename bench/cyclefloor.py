"""What the full-cycle goal stands against: the least work a durable intake-to-relay cycle does in CPython.

CycleFloor is the intake floor of bench.floor (aiosmtpd, one writer thread committing what is waiting
into SQLite with synchronous=FULL, 250 after COMMIT) with a relay process beside it, as careservice has
its worker: that process takes the stored mail in batches of BATCH, sends each one twice over
CONNECTIONS persistent relay connections (aiosmtplib, pipelined as careservice's relay client does): the
stored bytes as the forward and a fixed short text as the acknowledgement, and then deletes the batch
(secure_delete, as the purge promise needs). No encryption, parsing, templates, workflow state, limits,
logging or metrics: any cycle that forwards and acknowledges durably does at least this, so its CPU per
case, set against the cores the machine has left beside the load generator and the relay, is the most
cases/s CPython can reach here with the design's libraries.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

from bench.floor import DurableSink, PlainStore, open_mail_db, serve_durable
from bench.load import WORKER_CONTEXT, CustomerMails, Job, LoadResult, send
from bench.postfix import relay_sink
from bench.procstat import Meter, Usage, cpu_seconds
from bench.report import Row
from bench.servers import HOST, run_loop
from bench.settings import Settings, tried
from careservice.smtpclient import Mail, Session

BATCH = 64
DRAIN_SECONDS = 600.0  # bounds the wait for the floor's last delivery (a full run's 10,000 cases take ~15 s)
CONNECTIONS = 4
IDLE_POLL = 0.002  # seconds between looks at an empty table: the floor's only wake-up
SENDER = "care@floor.bench.localhost"
STAFF = "staff@floor.bench.localhost"
CUSTOMER = "customer@floor.bench.localhost"
ACK = (b"From: care@floor.bench.localhost\r\nTo: customer@floor.bench.localhost\r\nSubject: received\r\n"
       b"Auto-Submitted: auto-replied\r\n\r\nWe have your message and answer soon.\r\n")


class PlainCycle(PlainStore):
    """The floor's relay side beside its store: the stored bytes go out as the forward and a fixed short text as
    the acknowledgement, and the batch is deleted (bench.workfloor does the product's work instead)."""

    def open_relay(self, path: Path) -> sqlite3.Connection:
        conn = open_mail_db(path)
        conn.execute("PRAGMA synchronous=NORMAL")  # as careservice's worker: a lost delete only sends again
        conn.execute("PRAGMA secure_delete=ON")
        return conn

    def take(self, conn: sqlite3.Connection) -> list[tuple[int, tuple[Mail, Mail]]]:
        """Up to BATCH stored cases, each with its forward and acknowledgement."""
        rows = conn.execute("SELECT id, body FROM mail ORDER BY id LIMIT ?", (BATCH,)).fetchall()
        return [(row_id, (Mail(SENDER, [STAFF], body), Mail(SENDER, [CUSTOMER], ACK))) for row_id, body in rows]

    def done(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        """The relay took these cases' mail."""
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("DELETE FROM mail WHERE id=?", [(row_id,) for row_id in ids])
        conn.execute("COMMIT")


async def _send(client: aiosmtplib.SMTP, mails: list[Mail]) -> None:
    session = Session(client)
    for n, mail in enumerate(mails):  # each envelope ahead with the content before it, as careservice's outbox
        await session.sendmail(mail, mails[n + 1] if n + 1 < len(mails) else None)
    session.end(keep=True)


async def _relay(path: Path, relay_port: int, delivered: Any, last: Any, kind: PlainCycle) -> None:
    conn = kind.open_relay(path)
    clients = [aiosmtplib.SMTP(hostname=HOST, port=relay_port) for _ in range(CONNECTIONS)]
    for client in clients:
        await client.connect()
        await client.ehlo()  # pipelined sends need the EHLO's answer (careservice.smtpclient)
    while True:
        cases = kind.take(conn)
        if not cases:
            await asyncio.sleep(IDLE_POLL)
            continue
        await asyncio.gather(*(_send(c, [mail for _, pair in cases[i::CONNECTIONS] for mail in pair])
                               for i, c in enumerate(clients)))
        kind.done(conn, [case_id for case_id, _ in cases])
        with delivered.get_lock():
            delivered.value += len(cases)
            last.value = time.monotonic()


def _relay_main(path: Path, relay_port: int, delivered: Any, last: Any, uvloop: bool, kind: PlainCycle) -> None:
    run_loop(_relay(path, relay_port, delivered, last, kind), uvloop)


def _serve(port: int, path: Path, relay_port: int, delivered: Any, last: Any, ready: Any, uvloop: bool,
           kind: PlainCycle) -> None:
    """The intake in this process, the relay in a child of it (so the meter's process tree holds both)."""
    kind.open(path).close()  # the schema, before the two processes open the files at once
    relay = multiprocessing.get_context("fork").Process(target=_relay_main, daemon=True,
                                                        args=(path, relay_port, delivered, last, uvloop, kind))
    relay.start()
    try:
        serve_durable(port, path, ready, uvloop, kind)
    finally:
        relay.terminate()
        relay.join(10)


class CycleFloor(DurableSink):
    """The floor's two processes, relaying to `relay_port`; `delivered` counts the cases whose forward and
    ack the relay took, `last` is when the latest batch was done (time.monotonic)."""

    def __init__(self, relay_port: int, uvloop: bool = True, kind: PlainCycle | None = None) -> None:
        super().__init__(uvloop)
        self.relay_port = relay_port
        self.kind = kind or PlainCycle()
        self._delivered = WORKER_CONTEXT.Value("q", 0)
        self._last = WORKER_CONTEXT.Value("d", 0.0, lock=False)

    def process(self, ready: Any) -> Any:
        # not a daemon process: it has the relay as its child (stop() ends both)
        return WORKER_CONTEXT.Process(target=_serve, args=(
            self.port, self._dir / "mail.db", self.relay_port, self._delivered, self._last, ready, self.uvloop,
            self.kind))

    @property
    def delivered(self) -> int:
        return int(self._delivered.value)

    def wait_delivered(self, count: int, timeout: float) -> float:
        """Wait (bounded) until `count` cases are delivered; when the last of them was."""
        deadline = time.monotonic() + timeout
        while self.delivered < count:
            if time.monotonic() > deadline or not self._proc.is_alive():
                raise RuntimeError(f"cycle floor delivered {self.delivered} of {count} cases")
            time.sleep(0.05)
        return float(self._last.value)


@dataclass(frozen=True)
class Cycle:
    """One measured full cycle: the load's result, the server's usage, the seconds from the first MAIL FROM
    until the relay took the last forward and ack, and the server's CPU per case: all of it, and its first
    process's (the SMTP intake; the rest is its children's: careservice's workers, the floor's relay)."""

    result: LoadResult
    usage: Usage
    seconds: float
    cpu_ms: float
    intake_cpu_ms: float
    relay_cpu_ms: float  # the relay's CPU per case (its forward and ack), which shares the machine

    @property
    def split(self) -> str:
        rest = self.cpu_ms - self.intake_cpu_ms
        return (f"CPU {self.cpu_ms:.2f} ms/case: intake {self.intake_cpu_ms:.2f}, rest {rest:.2f}; "
                f"ceiling {self.ceiling:.0f}/s")

    @property
    def gen_cpu_ms(self) -> float:
        return 1000 * self.result.gen_cores * self.result.seconds / max(self.result.ok, 1)

    @property
    def ceiling(self) -> float:
        """Cases/s at which the server, the load generator and the relay, at their measured CPU per case,
        would keep every core that the hypervisor left to this machine busy: at these costs no run goes faster.
        The costs move with the rate and the steal, so it describes its own run, not another."""
        cores = (os.cpu_count() or 1) - self.usage.steal_cores
        return 1000 * cores / (self.cpu_ms + self.gen_cpu_ms + self.relay_cpu_ms)

    @property
    def extra(self) -> dict[str, float]:
        return {"cases": self.result.ok, "seconds": self.seconds, "intake_rate": self.result.rate,
                "cpu_ms_per_case": self.cpu_ms, "intake_cpu_ms_per_case": self.intake_cpu_ms,
                "gen_cpu_ms_per_case": self.gen_cpu_ms, "relay_cpu_ms_per_case": self.relay_cpu_ms,
                "ceiling_cases_s": self.ceiling}

    @property
    def rate(self) -> float:
        return self.result.ok / self.seconds

    @property
    def gen_cores(self) -> float:
        return self.result.gen_cores * self.result.seconds / self.seconds

    def usage_fields(self) -> dict[str, float]:
        """The CPU columns of a report row, in cores (the load generator's over the whole cycle)."""
        return {"server_cores": self.usage.server_cores, "gen_cores": self.gen_cores,
                "machine_cores": self.usage.machine_cores, "steal_cores": self.usage.steal_cores}

    @staticmethod
    def attempts_note(cycles: list[Cycle]) -> str:
        """A row's note on the attempts least_stolen made (empty for one)."""
        return tried(cycles, lambda c: f"{c.rate:.0f} cases/s at steal {c.usage.steal_cores:.2f}")


def measure(port: int, pid: int, relay_pid: int, cases: int, warmup: int, bound: float,
            delivered: Callable[[int], float]) -> Cycle:
    """Scenario 2's full cycle against the server `pid` (its process tree) listening on `port` and relaying to
    the process `relay_pid`: `warmup` mails, then `cases` by 10 senders (3 KB, one connection each, none
    started after `bound` seconds); `delivered(n)` waits (bounded) until n cases are delivered and gives
    when the last one was."""
    send(Job(port, CustomerMails(3_000), warmup, 10))
    delivered(warmup)
    meter, cpu0, own0 = Meter(pid, tree=True).start(), cpu_seconds(pid, tree=True), cpu_seconds(pid)
    relay0 = cpu_seconds(relay_pid, tree=True)
    result = send(Job(port, CustomerMails(3_000), cases, 10, 1, bound, first=warmup))
    last = delivered(warmup + result.ok)
    usage = meter.stop()
    per_case = 1000 / max(result.ok, 1)
    return Cycle(result, usage, last - min(r[1] for r in result.records),
                 per_case * (cpu_seconds(pid, tree=True) - cpu0), per_case * (cpu_seconds(pid) - own0),
                 per_case * (cpu_seconds(relay_pid, tree=True) - relay0))


def run_floor(uvloop: bool, cases: int, warmup: int, kind: PlainCycle | None = None) -> Cycle:
    """One full cycle of a fresh floor on the given loop, relaying to a fresh smtp-sink."""
    with relay_sink() as relay, CycleFloor(relay.port, uvloop, kind) as floor:
        return measure(floor.port, floor.pid, relay.pid, cases, warmup, DRAIN_SECONDS,
                       lambda n: floor.wait_delivered(n, DRAIN_SECONDS))


# each floor's loop (uvloop or not) and its work (bench.workfloor adds the product's)
FLOORS: dict[str, tuple[bool, type[PlainCycle]]] = {
    "floor: aiosmtpd + SQLite + aiosmtplib": (False, PlainCycle),
    "floor: aiosmtpd + SQLite + aiosmtplib uvloop": (True, PlainCycle)}


def floor_attempt(uvloop: bool, kind: type[PlainCycle], s: Settings) -> Callable[[], Cycle]:
    """One measurement of a floor, as scenario 2 measures careservice."""
    return lambda: run_floor(uvloop, s.cycle_cases, s.warmup, kind())


def median_row(case: str, target: str, reps: list[tuple[Cycle, list[Cycle]]], who: str) -> tuple[Row, Cycle]:
    """The row of one target's repetitions (each the least stolen of its attempts): the median repetition,
    with every repetition's figures in its note and extra."""
    cycle, cycles = sorted(reps, key=lambda rep: rep[0].rate)[(len(reps) - 1) // 2]
    result = cycle.result
    rates = ", ".join(f"{c.rate:.0f}" for c, _ in reps)
    row = Row("2 full cycle", case, target, cycle.rate, "cases/s", **cycle.usage_fields(),
              note=f"intake {result.rate:.0f} msg/s; {who} {cycle.split}"
                   + (f"; {result.failure_note}" if result.failed else "") + Cycle.attempts_note(cycles)
                   + (f"; median of {len(reps)} repetitions: {rates} cases/s" if len(reps) > 1 else ""),
              extra={**cycle.extra, "repetitions": [{"rate": c.rate, **c.extra, "steal_cores": c.usage.steal_cores,
                                                     "attempts": len(tries)} for c, tries in reps]})
    return row, cycle
