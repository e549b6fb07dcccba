"""SMTP load generator: raw asyncio sockets, PIPELINING when the server offers it, one or more processes.

Each message's latency runs from writing MAIL FROM to reading the 250 after the final ".". Every run
is bounded by a message count and a time limit; the generator's own CPU (getrusage of each worker
process) is reported so a saturated generator is never mistaken for a slow server.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from bench.procstat import Meter, Usage
from bench.report import percentile
from tests.support import CARE, customer_mail

PLACEHOLDER = b"XQXQXQXQ"  # replaced by the message index (8 digits) in sender, subject and Message-ID
GRACE = 30.0  # seconds a run may overrun its time limit (slow replies) before it is cut off
START_DELAY = 0.15  # workers start together this long after they are asked to
SATURATED = 0.9  # cores: a generator process busier than this may be the bottleneck
WORKER_CONTEXT = multiprocessing.get_context("forkserver")


@dataclass(frozen=True)
class Mail:
    mail_from: str  # "" = null sender
    rcpt: str
    data: bytes  # CRLF lines, dot-stuffed, ending in CRLF, without the final "."


def smtp_data(raw: bytes) -> bytes:
    """`raw` as DATA content: CRLF line ends, dot-stuffed, ending in CRLF."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def customer_address(index: int) -> str:
    return f"customer{index:08d}@customer.example"


@functools.lru_cache(maxsize=8)
def _customer_template(size: int) -> list[bytes]:
    def build(body: str) -> bytes:
        return smtp_data(customer_mail(
            "Order question ref XQXQXQXQ", body, sender="customerXQXQXQXQ@customer.example",
            name="Customer XQXQXQXQ", message_id=f"<XQXQXQXQ.{os.getpid()}.{time.time_ns()}@customer.example>"))

    line = "Hello, my tickets for the concert did not arrive, please have a look at my order.\n"
    empty = len(build(""))
    body = (line * (max(size - empty, len(line)) // len(line) + 1))[: max(size - empty, 1)]
    return build(body).split(PLACEHOLDER)


@dataclass(frozen=True)
class CustomerMails:
    """A customer's message of about `size` bytes to the care address; message i carries "ref <i>"."""

    size: int
    rcpt: str = CARE

    def __call__(self, index: int) -> Mail:
        return Mail(customer_address(index), self.rcpt, f"{index:08d}".encode().join(_customer_template(self.size)))


@dataclass(frozen=True)
class MailList:
    """Prepared messages, sent by index."""

    mails: tuple[Mail, ...]

    def __call__(self, index: int) -> Mail:
        return self.mails[index]


@dataclass(frozen=True)
class Job:
    port: int
    source: Callable[[int], Mail]
    count: int
    concurrency: int = 1
    per_conn: int = 1  # messages per connection (1 = connect + EHLO for each, as MTAs do)
    seconds: float = 30.0  # no new message starts after this
    rate: float = 0.0  # offered messages per second over all senders; 0 = as fast as the server takes them
    first: int = 0  # index of the first measured message
    warmup: int = 0  # messages sent (and not measured) before, with indices first - warmup ... first - 1


@dataclass
class WorkerResult:
    records: list[tuple[int, float, float]] = field(default_factory=list)  # (index, MAIL sent, 250 read)
    failures: Counter[str] = field(default_factory=Counter)  # reply code or error name -> count
    cpu: float = 0.0


@dataclass(frozen=True)
class LoadResult:
    ok: int
    failures: dict[str, int]
    seconds: float  # first MAIL FROM to last 250
    rate: float  # ok / seconds
    p50_ms: float
    p99_ms: float
    gen_cores: float  # CPU of all generator processes per second of wall time
    gen_max_proc_cores: float  # the busiest generator process
    procs: int
    records: list[tuple[int, float, float]]
    usage: Usage | None  # the server's and the machine's CPU while the generator ran
    warmed: int  # warm-up messages accepted before the measured ones

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def saturated(self) -> bool:
        return self.gen_max_proc_cores >= SATURATED

    def usage_fields(self) -> dict[str, Any]:
        """The CPU columns of a report row, in cores."""
        usage = self.usage
        return {"server_cores": usage.server_cores if usage else None,
                "machine_cores": usage.machine_cores if usage else None, "gen_cores": self.gen_cores,
                "steal_cores": usage.steal_cores if usage else None}

    @property
    def failure_note(self) -> str:
        return f"{self.failed} failed {self.failures}" if self.failed else ""


class SmtpError(Exception):
    """The server answered with an unexpected code."""


async def _reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("server closed the connection")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


async def _transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mail: Mail,
                       pipelining: bool) -> tuple[float, bytes]:
    """One message; returns (time MAIL FROM was written, final reply)."""
    commands = [f"MAIL FROM:<{mail.mail_from}>\r\n".encode(), f"RCPT TO:<{mail.rcpt}>\r\n".encode(), b"DATA\r\n"]
    started = time.monotonic()
    replies = []
    if pipelining:
        writer.write(b"".join(commands))
        replies = [await _reply(reader) for _ in commands]
    else:
        for command in commands:
            writer.write(command)
            replies.append(await _reply(reader))
            if replies[-1][:1] not in b"23":
                break
    if [r[:1] for r in replies] != [b"2", b"2", b"3"]:
        if replies[-1][:1] == b"3":  # DATA accepted after a refused RCPT: end it empty
            writer.write(b".\r\n")
            await _reply(reader)
        writer.write(b"RSET\r\n")
        await _reply(reader)
        return started, next(r for r in replies if r[:1] not in b"23")
    writer.writelines((mail.data, b".\r\n"))
    return started, await _reply(reader)


class _Plan:
    """The messages one worker sends, handed out in order to its senders."""

    def __init__(self, first: int, count: int, proc: int, procs: int) -> None:
        self.indices = iter(range(first + proc, first + count, procs))
        self.seq = 0
        self.result = WorkerResult()

    def take(self) -> tuple[int, int] | None:
        index = next(self.indices, None)
        if index is None:
            return None
        self.seq += 1
        return self.seq - 1, index


async def _sender(job: Job, plan: _Plan, t0: float, deadline: float, rate: float) -> None:
    """Send the plan's messages, `job.per_conn` per connection, until it is done or `deadline`."""
    result = plan.result
    item = plan.take()
    while item is not None and time.monotonic() < deadline:
        if rate:
            await asyncio.sleep(t0 + item[0] / rate - time.monotonic())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", job.port)
        except OSError as exc:
            result.failures[type(exc).__name__] += 1
            item = plan.take()
            continue
        try:
            if (await _reply(reader))[:1] != b"2":
                raise SmtpError("greeting")
            writer.write(b"EHLO load.bench.localhost\r\n")
            pipelining = b"PIPELINING" in await _reply(reader)
            for n in range(job.per_conn):
                if n:
                    item = plan.take()
                    if item is None or time.monotonic() >= deadline:
                        break
                    if rate:
                        await asyncio.sleep(t0 + item[0] / rate - time.monotonic())
                started, final = await _transaction(reader, writer, job.source(item[1]), pipelining)
                if final[:1] == b"2":
                    result.records.append((item[1], started, time.monotonic()))
                else:
                    result.failures[final[:3].decode(errors="replace")] += 1
            writer.write(b"QUIT\r\n")
            await _reply(reader)
        except (OSError, SmtpError, asyncio.IncompleteReadError) as exc:
            result.failures[type(exc).__name__] += 1
        finally:
            writer.close()
        item = plan.take()


async def _run(job: Job, proc: int, procs: int, start_at: float) -> WorkerResult:
    plan = _Plan(job.first, job.count, proc, procs)
    concurrency = job.concurrency // procs + (proc < job.concurrency % procs)
    await asyncio.sleep(start_at - time.monotonic())
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(job.seconds + GRACE):
            await asyncio.gather(*(_sender(job, plan, t0, t0 + job.seconds, job.rate / procs)
                                   for _ in range(concurrency)))
    except TimeoutError:
        plan.result.failures["timeout"] += 1
    return plan.result


def _worker(job: Job, proc: int, procs: int, start_at: float) -> WorkerResult:
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(_run(job, proc, procs, start_at))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def _together(pool: ProcessPoolExecutor, job: Job, procs: int, meter: Meter | None) -> tuple[list[WorkerResult],
                                                                                              Usage | None]:
    start_at = time.monotonic() + START_DELAY
    timer = threading.Timer(START_DELAY, meter.start) if meter else None
    if timer:
        timer.start()
    results = list(pool.map(_worker, [job] * procs, range(procs), [procs] * procs, [start_at] * procs))
    if timer and meter:
        timer.join()
        return results, meter.stop()
    return results, None


def send(job: Job, procs: int = 1, meter: Meter | None = None) -> LoadResult:
    """Run `job` in `procs` generator processes started together (after its warm-up); wait for all.
    `meter` (the server's) runs from the moment the measured messages start until the last is answered."""
    procs = max(1, min(procs, job.concurrency))
    warmed = 0
    with ProcessPoolExecutor(procs, mp_context=WORKER_CONTEXT) as pool:
        if job.warmup:
            warm = replace(job, first=job.first - job.warmup, count=job.warmup, warmup=0, rate=0.0, seconds=GRACE)
            warmed = sum(len(r.records) for r in _together(pool, warm, procs, None)[0])
        results, usage = _together(pool, job, procs, meter)
    records = sorted(r for result in results for r in result.records)
    failures: Counter[str] = Counter()
    for result in results:
        failures.update(result.failures)
    seconds = max(r[2] for r in records) - min(r[1] for r in records) if records else 0.0
    wall = max(seconds, 1e-9)
    latencies = [(r[2] - r[1]) * 1000 for r in records]
    return LoadResult(
        ok=len(records), failures=dict(failures), seconds=seconds, rate=len(records) / wall,
        p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
        gen_cores=sum(r.cpu for r in results) / wall, gen_max_proc_cores=max(r.cpu for r in results) / wall,
        procs=procs, records=records, usage=usage, warmed=warmed,
    )


def send_until_fast(job: Job, meter: Meter | None = None, max_procs: int = 2) -> LoadResult:
    """`send`, and again with more generator processes while one was saturated; the faster run counts."""
    best = send(job, 1, meter)
    procs = 1
    while best.saturated and procs < min(max_procs, job.concurrency):
        procs *= 2
        again = send(job, procs, meter)
        best = again if again.rate > best.rate else best
    return best
