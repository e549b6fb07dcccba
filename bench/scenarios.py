"""The six benchmark scenarios of issue 7; each returns table rows with ratios to baselines of the same run."""

from __future__ import annotations

import importlib
import inspect
import itertools
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

from bench import cyclefloor
from bench.floor import DurableSink, paused_worker
from bench.load import CustomerMails, Job, LoadResult, Mail, MailList, send, send_until_fast, smtp_data
from bench.postfix import Postfix, ensure_postfix, relay_sink
from bench.procstat import Meter
from bench.report import Row, judge, percentile
from bench.servers import BenchDaemon, PySink, Server
from careservice.store import read_status
from tests.support import STAFF, staff_reply

Log = Callable[[str], None]
SIZES = (3_000, 100_000)
SHAPES = ((1, 1), (10, 1), (1, 10), (10, 10))  # (concurrent senders, messages per connection)
DRAIN_TIMEOUT = 1800.0  # bounds every wait for the daemon; filling 100k cases (full run) takes minutes
# the latency row is measured again (in the full run, at most LATENCY_ATTEMPTS times) while the hypervisor
# took STEAL_LIMIT cores or more: with about one of the 2 cores stolen the daemon fell behind the offered
# 100 msg/s, and its p50 grew to seconds. Every attempt is reported; the row is the least stolen one.
LATENCY_ATTEMPTS = 3
STEAL_LIMIT = 0.05
ANSWER_TEXT = "Thank you for writing. Your tickets are on their way and should arrive tomorrow."


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    fresh_servers: bool  # scenario 1: a new server per run (else one per target and repetition)
    intake_count: dict[int, int]  # message size -> messages per intake run
    intake_seconds: float  # time limit of one intake run
    warmup: int  # messages before each measured run
    cycle_cases: int
    latency_seconds: float  # at the fixed offered load
    offered_rate: float
    answers: int
    form_posts: int
    imap_messages: int
    scale_levels: tuple[int, ...]
    scale_batch: int
    workers: int = 1  # service.workers of the daemon in scenario 2 (python -m bench --workers N)


QUICK = Settings(quick=True, reps=1, fresh_servers=False, intake_count={3_000: 300, 100_000: 100},
                 intake_seconds=0.6, warmup=20, cycle_cases=600, latency_seconds=3.0, offered_rate=100.0,
                 answers=200, form_posts=300, imap_messages=500, scale_levels=(1_000, 4_000), scale_batch=200)
FULL = Settings(quick=False, reps=3, fresh_servers=True, intake_count={3_000: 5_000, 100_000: 2_000},
                intake_seconds=20.0, warmup=200, cycle_cases=10_000, latency_seconds=20.0, offered_rate=100.0,
                answers=2_000, form_posts=5_000, imap_messages=5_000, scale_levels=(1_000, 10_000, 100_000),
                scale_batch=2_000)


@contextmanager
def careservice(relay: Server, workers: int = 1) -> Iterator[BenchDaemon]:
    """A fresh daemon (own data dir) relaying to `relay`, with `workers` worker processes."""
    settings = {"service.workers": str(workers)} if workers != 1 else {}
    with tempfile.TemporaryDirectory(prefix="careservice-bench-") as tmp, \
            BenchDaemon(Path(tmp), relay.port, settings=settings) as d:
        yield d


def _usage_fields(result: LoadResult) -> dict[str, Any]:
    usage = result.usage
    return {"server_cores": usage.server_cores if usage else None,
            "machine_cores": usage.machine_cores if usage else None, "gen_cores": result.gen_cores,
            "steal_cores": usage.steal_cores if usage else None}


def _failures(result: LoadResult) -> str:
    return f"{result.failed} failed {result.failures}" if result.failed else ""


def _drain(daemon: BenchDaemon, cases: int, what: str) -> None:
    """Wait until `cases` forwards and acks have been delivered in all."""
    if not daemon.log.wait({"forward": cases, "ack": cases}, DRAIN_TIMEOUT):
        raise RuntimeError(f"{what}: delivered {dict(daemon.log.delivered)} of {cases} cases after "
                           f"{DRAIN_TIMEOUT} s; log: {' | '.join(list(daemon.log.tail)[-3:])}")


# ----- 1. durable intake -----

TARGETS = ("careservice", "bare aiosmtpd", "bare aiosmtpd uvloop", "postfix")  # goals: vs the standard asyncio loop
# what bounds the goal from below (bench/floor.py), measured for 3 KB mail, where the goal is judged
FLOORS = ("careservice, worker paused", "aiosmtpd + SQLite", "aiosmtpd + SQLite uvloop")


def _targets(size: int) -> tuple[str, ...]:
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
    _drain(server.daemon, log.committed, "intake run")
    return result, f"committed {log.committed - before} < accepted {accepted - before}" \
        if log.committed < accepted else ""


def _median_row(scenario: str, case: str, target: str, results: list[LoadResult], unit: str) -> Row:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    fields = [_usage_fields(r) for r in results]
    failed = sum(r.failed for r in results)
    return Row(scenario, case, target, med([r.rate for r in results]), unit, med([r.p50_ms for r in results]),
               med([r.p99_ms for r in results]), med([f["server_cores"] for f in fields]),
               med([r.gen_cores for r in results]), med([f["machine_cores"] for f in fields]),
               med([f["steal_cores"] for f in fields]),
               note=(f"{failed} failed; " if failed else "") + ("generator saturated; " if any(
                   r.saturated for r in results) else "") + (f"median of {len(results)}" if len(results) > 1 else ""),
               extra={"runs": [{"rate": r.rate, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "ok": r.ok,
                                "failures": r.failures, "gen_procs": r.procs, **_usage_fields(r)} for r in results]})


def intake(s: Settings, log: Log) -> list[Row]:
    """careservice vs a bare aiosmtpd handler vs Postfix: msg/s and MAIL FROM -> 250 latency."""
    why_no_postfix = ensure_postfix() or Postfix.unavailable() or _postfix_starts()
    missing = {"postfix": why_no_postfix}
    targets = [t for t in TARGETS + FLOORS if not missing.get(t)]
    runs: dict[tuple[int, int, int, str], list[LoadResult]] = defaultdict(list)
    notes: dict[tuple[int, int, int, str], str] = {}
    configs = [(size, conc, per_conn) for size in SIZES for conc, per_conn in SHAPES]

    offsets = itertools.count(0, 100_000)  # every run its own customers (acks are limited per address)

    def measure(server: _Target, target: str, size: int, conc: int, per_conn: int, rep: int) -> None:
        result, note = _intake_run(server, size, conc, per_conn, s, next(offsets))
        runs[(size, conc, per_conn, target)].append(result)
        if note:
            notes[(size, conc, per_conn, target)] = note
        log(f"1 intake rep {rep + 1} {size // 1000} KB c={conc} pc={per_conn} {target}: "
            f"{result.rate:.0f} msg/s p99 {result.p99_ms:.1f} ms {_failures(result)}")

    for rep in range(s.reps):  # repetitions outermost: drift of the shared machine spreads over all targets
        if s.fresh_servers:  # a new server for every run, targets alternating
            for config in configs:
                for target in targets:
                    if target in _targets(config[0]):
                        with _intake_server(target) as server:
                            measure(server, target, *config, rep)
        else:  # one server per target for all its runs (quick)
            for target in targets:
                with _intake_server(target) as server:
                    for config in configs:
                        if target in _targets(config[0]):
                            measure(server, target, *config, rep)
    rows = []
    for size in SIZES:
        for conc, per_conn in SHAPES:
            case = f"{size // 1000} KB c={conc} pc={per_conn}"
            group = {t: _median_row("1 durable intake", case, t, runs[(size, conc, per_conn, t)], "msg/s")
                     for t in targets if t in _targets(size)}
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
            rows.extend(group[t] for t in _targets(size))
    return rows


# ----- 2. full cycle -----


def full_cycle(s: Settings, log: Log, bare_rate: float | None) -> list[Row]:
    """Cases/s from SMTP intake to forward and ack at the relay; forward latency at a fixed offered load."""
    rows = []
    workers = f", workers = {s.workers}" if s.workers != 1 else ""
    with relay_sink() as relay, careservice(relay, s.workers) as daemon:
        def delivered(cases: int) -> float:
            _drain(daemon, cases, "warm-up" if cases <= s.warmup else "full cycle")  # measure() waits for both
            return max(daemon.log.last["forward"], daemon.log.last["ack"])

        cycle = cyclefloor.measure(daemon.port, daemon.pid, relay.pid, s.cycle_cases, s.warmup, DRAIN_TIMEOUT,
                                   delivered)
        result, rate = cycle.result, cycle.rate
        row = Row("2 full cycle", f"3 KB c=10 pc=1, forward+ack to relay{workers}", "careservice", rate, "cases/s",
                  server_cores=cycle.usage.server_cores, gen_cores=cycle.gen_cores,
                  machine_cores=cycle.usage.machine_cores, steal_cores=cycle.usage.steal_cores,
                  note=f"intake {result.rate:.0f} msg/s; daemon {cycle.split}"
                       + (f"; {_failures(result)}" if result.failed else ""),
                  extra=cycle.extra)
        if bare_rate:
            row.ratios["bare aiosmtpd intake"] = rate / bare_rate
        judge(row, ">= 600 cases/s", rate >= 600)
        rows.append(row)
        log(f"2 full cycle: {rate:.0f} cases/s (intake {result.rate:.0f} msg/s)")
    floors = cyclefloor.rows(s.cycle_cases, s.warmup, "3 KB c=10 pc=1, forward+ack to relay", bare_rate)
    for floor in floors:
        row.ratios[floor.target] = rate / floor.value  # type: ignore[operator]
        log(f"2 full cycle {floor.target}: {floor.value:.0f} cases/s ({floor.note})")
    rows.extend(floors)
    attempts = [_latency_attempt(s)]
    while len(attempts) < (1 if s.quick else LATENCY_ATTEMPTS) and _steal(attempts[-1][0]) >= STEAL_LIMIT:
        log(f"2 latency: host steal {_steal(attempts[-1][0]):.2f} cores, measuring again")
        attempts.append(_latency_attempt(s))
    result, latencies = min(attempts, key=lambda attempt: _steal(attempt[0]))
    p99 = percentile(latencies, 99)
    tried = "; ".join(f"attempt {n}: p99 {percentile(lat, 99):.1f} ms at steal {_steal(r):.2f}"
                      for n, (r, lat) in enumerate(attempts, 1))
    row = Row("2 full cycle", f"250 -> forward at relay, {s.offered_rate:.0f} msg/s offered{workers}",
              "careservice", result.rate, "msg/s", percentile(latencies, 50), p99, **_usage_fields(result),
              note=f"{len(latencies)} forwards timed; intake p99 {result.p99_ms:.1f} ms; {_failures(result)}"
              .rstrip("; ") + (f"; the least stolen of {tried}" if len(attempts) > 1 else ""),
              extra={"max_ms": max(latencies, default=0.0),
                     "attempts": [{"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), **_usage_fields(r)}
                                  for r, lat in attempts]})
    judge(row, "p99 < 50 ms", bool(latencies) and p99 < 50)
    rows.append(row)
    log(f"2 latency at {s.offered_rate:.0f}/s: p50 {row.p50_ms:.1f} ms p99 {p99:.1f} ms")
    return rows


def _steal(result: LoadResult) -> float:
    return result.usage.steal_cores if result.usage else 0.0


def _latency_attempt(s: Settings) -> tuple[LoadResult, list[float]]:
    """One latency measurement on a fresh daemon: the paced run, and each forward's 250 -> relay in ms."""
    with PySink(record=True) as relay, careservice(relay, s.workers) as daemon:
        count = int(s.offered_rate * s.latency_seconds)
        # warm up, then wait until the warm-up's cases are delivered: a backlog left by the (unpaced)
        # warm-up would otherwise delay the first paced second (it made the full run's p99 1.1 s)
        warm = send(Job(daemon.port, CustomerMails(3_000), s.warmup, 10))
        _drain(daemon, warm.ok, "latency warm-up")
        result = send(Job(daemon.port, CustomerMails(3_000), count, 10, 1, s.latency_seconds + 5,
                          rate=s.offered_rate, first=s.warmup), meter=Meter(daemon.pid, tree=True))
        _drain(daemon, warm.ok + result.ok, "latency run")
        accepted = {index: done for index, _, done in result.records}
        arrived = {a.index: a.t for a in relay.taken("forward") if a.index in accepted}
        return result, [(arrived[i] - accepted[i]) * 1000 for i in arrived]


# ----- 3. answer and purge -----


def _left(data_dir: Path, case_ids: list[str]) -> dict[str, int]:
    """Rows and keys still stored for `case_ids` (read-only connections)."""
    marks = ",".join("?" * len(case_ids))
    out = {}
    for db, table, column in (("cases.db", "cases", "id"), ("cases.db", "outbox", "case_id"),
                              ("keys.db", "keys", "id")):
        conn = sqlite3.connect(f"file:{data_dir / db}?mode=ro", uri=True)
        try:
            out[f"{table}_left"] = conn.execute(f"SELECT count(*) FROM {table} WHERE {column} IN ({marks})",
                                                case_ids).fetchone()[0]
        finally:
            conn.close()
    return out


def answer_and_purge(s: Settings, log: Log, bare_rate: float | None) -> list[Row]:
    """Staff answers/s, and time from the relay's 250 for an answer to its case's purge committed."""
    with PySink(record=True, keep_forwards=True) as relay, careservice(relay) as daemon:
        opened = send(Job(daemon.port, CustomerMails(3_000), s.answers, 10))
        _drain(daemon, opened.ok, "opening cases")
        forwards = {a.index: a for a in relay.taken("forward")}
        replies = []
        for index in sorted(forwards):
            forward = message_from_bytes(forwards[index].raw, policy=policy.default)
            raw = staff_reply(forward, ANSWER_TEXT, sender=STAFF)  # type: ignore[arg-type]
            replies.append(Mail(STAFF, str(forward["Reply-To"]), smtp_data(raw)))
        meter = Meter(daemon.pid, tree=True).start()
        result = send(Job(daemon.port, MailList(tuple(replies)), len(replies), 10, 1, DRAIN_TIMEOUT))
        if not daemon.log.wait({"answer": result.ok}, DRAIN_TIMEOUT):
            raise RuntimeError(f"answers delivered {daemon.log.delivered['answer']} of {result.ok}")
        usage = meter.stop()
        seconds = daemon.log.last["answer"] - min(r[1] for r in result.records)
        case_of = {a.index: a.case_id for a in forwards.values()}
        answered = {case_of[a.index]: a.t for a in relay.taken("answer")}
        purge_ms = [(daemon.log.answer_purged[c] - t) * 1000 for c, t in answered.items()
                    if c in daemon.log.answer_purged]
        left = _left(daemon.data_dir, list(case_of.values()))
        rate = result.ok / seconds
        row = Row("3 answer and purge", "staff reply -> answer at relay -> purge", "careservice", rate, "answers/s",
                  percentile(purge_ms, 50), percentile(purge_ms, 99), usage.server_cores,
                  result.gen_cores * result.seconds / seconds, usage.machine_cores, usage.steal_cores,
                  note=f"latency = relay 250 -> purge committed; max {max(purge_ms, default=0):.0f} ms; "
                       f"left after: {left}" + (f"; {_failures(result)}" if result.failed else ""),
                  extra={"answers": result.ok, "purge_max_ms": max(purge_ms, default=0.0), **left})
        if bare_rate:
            row.ratios["bare aiosmtpd intake"] = rate / bare_rate
        judge(row, "p99 < 1000 ms, nothing left", bool(purge_ms) and percentile(purge_ms, 99) < 1000
              and not any(left.values()))
        log(f"3 answers: {rate:.0f}/s purge p50 {row.p50_ms:.0f} ms p99 {row.p99_ms:.0f} ms left {left}")
        return [row]


# ----- 4. form and 5. IMAP: modules of their own (bench/form.py, bench/imap.py), when present -----


def _module(name: str) -> Any:
    """The module, or None while nobody has written it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def form(s: Settings, log: Log) -> list[Row]:
    """Valid form POSTs committed (and forwarded) per second; baseline: GET of the form page."""
    case = "valid POSTs, verification off, 10 clients"
    module = _module("bench.form")
    if module is None:
        return [Row("4 form", case, "careservice", None, "posts/s", note="n/a: bench/form.py not there")]
    r = module.run(s.form_posts, 10)
    # the measure: POSTs accepted and committed (303) per second; forward + ack follow at the worker's pace
    end_to_end = f"{r['rate']:.0f}/s forwarded and acked" if r.get("rate") else "not drained"
    row = Row("4 form", case, "careservice", r.get("accepted_rate"), "posts/s", r.get("p50_ms"), r.get("p99_ms"),
              r.get("server_cores"), r.get("gen_cores"), r.get("machine_cores"), r.get("steal_cores"),
              note="; ".join(n for n in (f"committed (303); {end_to_end}", str(r.get("note", ""))) if n), extra=r)
    base = Row("4 form", case, "GET form page", r.get("baseline_rate"), "req/s", r.get("baseline_p50_ms"),
               gen_cores=r.get("baseline_gen_cores"))
    if row.value and base.value:
        row.ratios["GET form page"] = row.value / base.value
    judge(row, ">= 500 posts/s", (row.value or 0) >= 500)
    log(f"4 form: {row.value} posts/s")
    return [row, base]


def imap(s: Settings, log: Log) -> list[Row]:
    """IMAP drain by careservice vs a plain imapclient fetch+delete loop against the same Dovecot."""
    case = f"drain {s.imap_messages:,} x 3 KB"
    module = _module("bench.imap")
    if module is None:
        return [Row("5 IMAP", case, "careservice", None, "msg/s", note="n/a: bench/imap.py not there")]
    accepted = inspect.signature(module.run).parameters
    kwargs = {k: v for k, v in (("reps", 1), ("samples", 10)) if k in accepted} if s.quick else {}
    r = module.run(s.imap_messages, 3_000, **kwargs)
    row = Row("5 IMAP", case, "careservice", r.get("careservice_msg_s"), "msg/s", r.get("append_to_forward_p50_ms"),
              r.get("append_to_forward_p99_ms"), note="latency: APPEND -> forward at relay", extra=r)
    base = Row("5 IMAP", case, "imapclient loop", r.get("baseline_msg_s"), "msg/s", r.get("plain_idle_exists_p50_ms"),
               r.get("plain_idle_exists_p99_ms"), note="latency: APPEND -> EXISTS in a plain IDLE session")
    if row.value and base.value:
        row.ratios["imapclient loop"] = row.value / base.value
        judge(row, ">= 0.5x imapclient loop", row.value / base.value >= 0.5)
    log(f"5 IMAP: {row.value} msg/s vs {base.value}")
    return [row, base]


# ----- 6. scale -----


def scale(s: Settings, log: Log) -> list[Row]:
    """Memory and per-case cost of the daemon with 1k, 10k (and 100k) open cases."""
    rows: list[Row] = []
    with relay_sink() as relay, careservice(relay) as daemon:
        sent = 0
        rss0 = daemon.rss()
        for level in s.scale_levels:
            fill = level - sent - s.scale_batch
            if fill > 0:
                filled = send(Job(daemon.port, CustomerMails(3_000), fill, 10, 10, DRAIN_TIMEOUT, first=sent))
                sent += filled.ok
                _drain(daemon, sent, f"filling to {level}")
            cpu0 = daemon.cpu()
            result = send(Job(daemon.port, CustomerMails(3_000), s.scale_batch, 10, 1, DRAIN_TIMEOUT, first=sent),
                          meter=Meter(daemon.pid, tree=True))
            sent += result.ok
            _drain(daemon, sent, f"batch at {level}")
            cost_ms = 1000 * (daemon.cpu() - cpu0) / result.ok
            rss = daemon.rss()
            open_cases = read_status(daemon.data_dir)["open_cases"]
            row = Row("6 scale", f"{open_cases:,} open cases", "careservice", result.rate, "msg/s", result.p50_ms,
                      result.p99_ms, **_usage_fields(result),
                      note=f"RSS {rss / 2**20:.0f} MB (idle {rss0 / 2**20:.0f} MB); daemon CPU {cost_ms:.2f} ms/case",
                      extra={"open_cases": open_cases, "rss_bytes": rss, "cpu_ms_per_case": cost_ms})
            if rows:
                first = rows[0]
                row.ratios["1k cost"] = cost_ms / first.extra["cpu_ms_per_case"]
                row.ratios["1k intake"] = result.rate / (first.value or 1)
            goals = []
            if level == 10_000:
                goals.append(rss < 200 * 2**20)
            if rows:
                goals.append(abs(row.ratios["1k cost"] - 1) <= 0.2)
            if goals:
                judge(row, ("RSS < 200 MB, " if level == 10_000 else "") + "cost within 20% of 1k", all(goals))
            rows.append(row)
            log(f"6 scale {open_cases} open: RSS {rss / 2**20:.0f} MB, {cost_ms:.2f} ms/case, {result.rate:.0f} msg/s")
    return rows


SCENARIOS: dict[str, tuple[str, Callable[[Settings, Log, float | None], list[Row]]]] = {
    "1": ("1 durable intake", lambda s, log, bare: intake(s, log)),
    "2": ("2 full cycle", full_cycle),
    "3": ("3 answer and purge", answer_and_purge),
    "4": ("4 form", lambda s, log, bare: form(s, log)),
    "5": ("5 IMAP", lambda s, log, bare: imap(s, log)),
    "6": ("6 scale", lambda s, log, bare: scale(s, log)),
    "7": ("7 nodes", lambda s, log, bare: _nodes(s, log)),
}


def _nodes(s: Settings, log: Log) -> list[Row]:
    nodes = importlib.import_module("bench.nodes")
    return nodes.run(s.cycle_cases, s.warmup, log, nodes.QUICK_SETUPS if s.quick else nodes.SETUPS)


def run(selected: list[str], s: Settings, log: Log) -> list[Row]:
    """Run the selected scenarios in order; a failing scenario becomes an error row, the rest still run."""
    rows: list[Row] = []
    for key in selected:
        name, scenario = SCENARIOS[key]
        started = time.monotonic()
        bare = next((r.value for r in rows if r.scenario == "1 durable intake" and r.target == "bare aiosmtpd"
                     and r.case == "3 KB c=10 pc=1"), None)
        try:
            rows += scenario(s, log, bare)
        except Exception as exc:  # report it in the table and go on with the next scenario
            log(f"scenario {name} failed: {type(exc).__name__}: {exc}")
            rows.append(Row(name, "-", "careservice", None, "", verdict="ERROR",
                            note=f"{type(exc).__name__}: {exc}"[:300]))
        log(f"scenario {name} took {time.monotonic() - started:.0f} s")
    return rows
