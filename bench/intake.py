"""Scenario 1, durable intake: careservice against a bare aiosmtpd handler and Postfix, and the floors below it."""

from __future__ import annotations

import itertools
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.floor import DurableSink, paused_worker
from bench.load import CustomerMails, Job, LoadResult, send_until_fast
from bench.postfix import Postfix, ensure_postfix, relay_sink
from bench.procstat import Meter
from bench.report import Row, judge
from bench.servers import BenchDaemon, PySink, careservice
from bench.settings import Log, Settings

SIZES = (3_000, 100_000)
SHAPES = ((1, 1), (10, 1), (1, 10), (10, 10))  # (concurrent senders, messages per connection)
TARGETS = ("careservice", "bare aiosmtpd", "bare aiosmtpd uvloop", "postfix")  # goals: vs the standard asyncio loop
# what bounds the goal from below (bench/floor.py), measured for 3 KB mail, where the goal is judged
FLOORS = ("careservice, worker paused", "aiosmtpd + SQLite", "aiosmtpd + SQLite uvloop")
GOAL_SHAPE = (10, 1)  # (concurrent senders, messages per connection) where the goal is judged


def _targets(size: int, shape: tuple[int, int], s: Settings) -> tuple[str, ...]:
    """What is measured for mail of `size` sent in `shape`. The quick run keeps its time limit by measuring
    the floors, and 100 KB mail, only at the goal's shape."""
    if s.quick and shape != GOAL_SHAPE:
        return TARGETS if size == 3_000 else ()
    return TARGETS + FLOORS if size == 3_000 else TARGETS


@dataclass
class _Target:
    port: int
    meter: Callable[[], Meter]
    daemon: BenchDaemon | None = None


@contextmanager
def _intake_server(target: str) -> Iterator[_Target]:
    with ExitStack() as stack:
        if target == "careservice":
            daemon = stack.enter_context(careservice(stack.enter_context(relay_sink())))
            yield _Target(daemon.port, lambda: Meter(daemon.pid, tree=True), daemon)
        elif target == "careservice, worker paused":  # no drain between runs: the mail waits for the worker
            daemon = stack.enter_context(careservice(stack.enter_context(relay_sink())))
            stack.enter_context(paused_worker(daemon))
            yield _Target(daemon.port, lambda: Meter(daemon.pid, tree=True))
        elif target.startswith("aiosmtpd + SQLite"):
            floor = stack.enter_context(DurableSink(uvloop=target.endswith("uvloop")))
            yield _Target(floor.port, lambda: Meter(floor.pid))
        elif target.startswith("bare aiosmtpd"):
            sink = stack.enter_context(PySink(uvloop=target.endswith("uvloop")))
            yield _Target(sink.port, lambda: Meter(sink.pid))
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="careservice-bench-postfix-"))
            postfix = stack.enter_context(Postfix(Path(tmp)))
            yield _Target(postfix.port, lambda: Meter(postfix.pid, tree=True))


def _postfix_starts() -> str:
    """"" if a private Postfix starts here, else why not."""
    try:
        with tempfile.TemporaryDirectory(prefix="careservice-bench-postfix-") as tmp, Postfix(Path(tmp)):
            return ""
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"postfix would not start: {exc}"[:200]


def _intake_run(server: _Target, size: int, conc: int, per_conn: int, s: Settings, first: int) -> tuple[LoadResult,
                                                                                                          str]:
    """One measured run (after its warm-up); careservice then drains its outbox so runs do not overlap."""
    job = Job(server.port, CustomerMails(size), s.intake_count[size], conc, per_conn, s.intake_seconds,
              first=first + s.warmup, warmup=s.warmup)
    before = server.daemon.log.committed if server.daemon else 0
    result = send_until_fast(job, server.meter())
    if server.daemon is None:
        return result, ""
    log, accepted = server.daemon.log, before + result.ok + result.warmed
    deadline = time.monotonic() + 5
    while log.committed < accepted and time.monotonic() < deadline:  # the log pipe may lag a little
        time.sleep(0.05)
    server.daemon.drain(log.committed, "intake run")
    return result, f"committed {log.committed - before} < accepted {accepted - before}" \
        if log.committed < accepted else ""


def _median_row(scenario: str, case: str, target: str, results: list[LoadResult], unit: str) -> Row:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    fields = [r.usage_fields() for r in results]
    failed = sum(r.failed for r in results)
    return Row(scenario, case, target, med([r.rate for r in results]), unit, med([r.p50_ms for r in results]),
               med([r.p99_ms for r in results]), med([f["server_cores"] for f in fields]),
               med([r.gen_cores for r in results]), med([f["machine_cores"] for f in fields]),
               med([f["steal_cores"] for f in fields]),
               note=(f"{failed} failed; " if failed else "") + ("generator saturated; " if any(
                   r.saturated for r in results) else "") + (f"median of {len(results)}" if len(results) > 1 else ""),
               extra={"runs": [{"rate": r.rate, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "ok": r.ok,
                                "failures": r.failures, "gen_procs": r.procs, **r.usage_fields()} for r in results]})


def intake(s: Settings, log: Log) -> list[Row]:
    """careservice vs a bare aiosmtpd handler vs Postfix: msg/s and MAIL FROM -> 250 latency."""
    why_no_postfix = ensure_postfix() or Postfix.unavailable() or _postfix_starts()
    missing = {"postfix": why_no_postfix}
    targets = [t for t in TARGETS + FLOORS if not missing.get(t)]
    runs: dict[tuple[int, int, int, str], list[LoadResult]] = defaultdict(list)
    notes: dict[tuple[int, int, int, str], str] = {}
    plan = {(size, conc, per_conn): measured for size in SIZES for conc, per_conn in SHAPES
            if (measured := _targets(size, (conc, per_conn), s))}

    offsets = itertools.count(0, 100_000)  # every run its own customers (acks are limited per address)

    def measure(server: _Target, target: str, size: int, conc: int, per_conn: int, rep: int) -> None:
        result, note = _intake_run(server, size, conc, per_conn, s, next(offsets))
        runs[(size, conc, per_conn, target)].append(result)
        if note:
            notes[(size, conc, per_conn, target)] = note
        log(f"1 intake rep {rep + 1} {size // 1000} KB c={conc} pc={per_conn} {target}: "
            f"{result.rate:.0f} msg/s p99 {result.p99_ms:.1f} ms {result.failure_note}")

    for rep in range(s.reps):  # repetitions outermost: drift of the shared machine spreads over all targets
        if s.fresh_servers:  # a new server for every run, targets alternating
            for config, measured in plan.items():
                for target in targets:
                    if target in measured:
                        with _intake_server(target) as server:
                            measure(server, target, *config, rep)
        else:  # one server per target for all its runs (quick)
            for target in targets:
                with _intake_server(target) as server:
                    for config, measured in plan.items():
                        if target in measured:
                            measure(server, target, *config, rep)
    rows = []
    for (size, conc, per_conn), measured in plan.items():
        case = f"{size // 1000} KB c={conc} pc={per_conn}"
        group = {t: _median_row("1 durable intake", case, t, runs[(size, conc, per_conn, t)], "msg/s")
                 for t in targets if t in measured}
        for target, why in missing.items():
            if why:
                group[target] = Row("1 durable intake", case, target, None, "msg/s", note=why)
        ours = group["careservice"]
        ours.note = "; ".join(n for n in (ours.note, notes.get((size, conc, per_conn, "careservice"), "")) if n)
        for base in TARGETS[1:]:
            if group[base].value and ours.value:
                ours.ratios[base] = ours.value / group[base].value
        for floor in FLOORS:
            for base in TARGETS[1:]:
                if floor in group and group[floor].value and group[base].value:
                    group[floor].ratios[base] = group[floor].value / group[base].value
        if size == 3_000 and conc == 10:
            bare, postfix = ours.ratios.get("bare aiosmtpd"), ours.ratios.get("postfix")
            judge(ours, ">= 0.8x bare, >= 1.3x postfix",
                  bare is not None and bare >= 0.8 and (postfix is None or postfix >= 1.3))
        rows.extend(group[t] for t in measured)
    return rows
