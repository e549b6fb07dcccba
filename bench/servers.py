"""Everything a benchmark measures or sends to, each on 127.0.0.1 and stopped by its owner.

PySink: aiosmtpd answering 250 to everything in its own process (the bare-handler baseline, or a
relay that notes when each forward, ack and answer arrived).
BenchDaemon: `careservice run` as a subprocess with a generated config, its log read as it is written.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Self

import uvloop as uvloops
from aiosmtpd.smtp import SMTP

from bench.load import WORKER_CONTEXT, CustomerMails, Job, LoadResult, send
from bench.procstat import Meter, cpu_seconds, rss_bytes
from tests.support import CARE, STAFF, free_port

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 1800.0  # bounds every wait for the daemon; filling 100k cases (full run) takes minutes
MAX_MESSAGE = 1_000_000
_TOKEN = re.compile(rb"ref (\d{8})")
_REPLY_CASE = re.compile(rb"care\+([0-9a-f]{12})\.")
_CUSTOMER = re.compile(r"customer(\d{8})@")


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs careservice, its stages and templates included, from source tree `tree`
    (bench/treepath/sitecustomize.py), with the bench's modules after the tree's."""
    path = (str(tree), str(REPO / "bench" / "treepath"), str(REPO), os.environ.get("PYTHONPATH", ""))
    return {"PYTHONPATH": os.pathsep.join(p for p in path if p), "CARESERVICE_TREE": str(tree)}


def wait_port(port: int, alive: Any = None, timeout: float = START_TIMEOUT) -> None:
    """Wait until something listens on 127.0.0.1:`port`; `alive()` False means it died trying."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server for port {port} exited while starting")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout} s")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """start() / stop() and a `with` block that stops whatever started."""

    port: int

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ----- the Python sink -----


@dataclass(frozen=True)
class Arrival:
    """One message at the PySink: when (monotonic), what, for which customer message and case."""

    t: float
    kind: str  # forward | ack | answer | notice
    index: int  # the customer message's index ("ref <i>" / customer<i>@), -1 if none
    case_id: str
    raw: bytes  # forwards only, when the sink keeps them


def _arrival(t: float, rcpts: list[str], raw: bytes, keep_forwards: bool) -> Arrival:
    head = raw[: raw.find(b"\r\n\r\n")]
    customer = next((m for m in map(_CUSTOMER.search, rcpts) if m), None)
    if customer:
        kind = "ack" if b"\nauto-submitted:" in head.lower() else "answer"
        return Arrival(t, kind, int(customer.group(1)), "", b"")
    case, token = _REPLY_CASE.search(head), _TOKEN.search(head)
    if case is None:
        return Arrival(t, "notice", -1, "", b"")
    return Arrival(t, "forward", int(token.group(1)) if token else -1, case.group(1).decode(),
                   raw if keep_forwards else b"")


class _SinkHandler:
    def __init__(self, arrivals: Queue[Arrival | None] | None, keep_forwards: bool) -> None:
        self.arrivals = arrivals
        self.keep_forwards = keep_forwards

    async def handle_DATA(self, server: SMTP, session: object, envelope: Any) -> str:
        if self.arrivals is not None:
            self.arrivals.put(_arrival(time.monotonic(), envelope.rcpt_tos, envelope.original_content,
                                       self.keep_forwards))
        return "250 2.0.0 OK"


async def serve_until_term(handler: Any, hostname: str, port: int, ready: Any) -> None:
    """aiosmtpd with `handler` on 127.0.0.1:`port` until SIGTERM; `ready` is set once it listens."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=hostname, data_size_limit=MAX_MESSAGE * 2, enable_SMTPUTF8=True), HOST, port)
    ready.set()
    await stop.wait()
    server.close()
    await server.wait_closed()


def _serve_sink(port: int, arrivals: Queue[Arrival | None] | None, keep_forwards: bool, ready: Any,
                uvloop: bool = False) -> None:
    async def main() -> None:
        await serve_until_term(_SinkHandler(arrivals, keep_forwards), "sink.bench.localhost", port, ready)
        if arrivals is not None:
            arrivals.put(None)

    run_loop(main(), uvloop)


def run_loop(main: Coroutine[Any, Any, None], uvloop: bool) -> None:
    """A server process's main coroutine on the standard asyncio loop, or on uvloop."""
    (uvloops.run if uvloop else asyncio.run)(main)


class PySink(Server):
    """aiosmtpd in its own process answering 250 without storing; with `record`, arrivals are collected."""

    def __init__(self, record: bool = False, keep_forwards: bool = False, uvloop: bool = False) -> None:
        self.port = free_port()
        self.uvloop = uvloop  # the second baseline: the same handler on uvloop
        self.record = record
        self.keep_forwards = keep_forwards
        self.arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self._queue: Queue[Arrival | None] | None = WORKER_CONTEXT.Queue() if record else None
        self._proc: Any = None
        self._collector: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self) -> PySink:
        ready = WORKER_CONTEXT.Event()
        self._proc = WORKER_CONTEXT.Process(target=_serve_sink, args=(self.port, self._queue, self.keep_forwards,
                                                                      ready, self.uvloop), daemon=True)
        self._proc.start()
        if self._queue is not None:
            self._collector = threading.Thread(target=self._collect, daemon=True)
            self._collector.start()
        if not ready.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError("sink did not start")
        return self

    def _collect(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            with self._lock:
                self.arrivals.append(item)

    def taken(self, kind: str) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if a.kind == kind]

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
            if self._queue is not None:
                self._queue.put(None)
        if self._collector is not None:
            self._collector.join(10)
        self._proc = None


# ----- careservice -----


def bare_run(count: int, first: int, warmup: int, seconds: float, uvloop: bool = False) -> LoadResult:
    """A fresh bare aiosmtpd taking `count` 3 KB mails (after `warmup`) from 10 senders, one per connection."""
    with PySink(uvloop=uvloop) as sink:
        return send(Job(sink.port, CustomerMails(3_000), count, 10, 1, seconds, first=first, warmup=warmup),
                    meter=Meter(sink.pid))


def write_config(root: Path, relay_port: int) -> tuple[Path, int]:
    """A production-like config (INFO logs, one site, one staff address) on free loopback ports."""
    ports: set[int] = set()
    while len(ports) < 3:  # free_port() picks at random: two listeners must not draw the same one
        ports.add(free_port())
    smtp_port, web_port, admin_port = sorted(ports)
    path = root / "config.toml"
    path.write_text(f"""
[service]
data_dir = "data"
log_level = "INFO"
[security]
master_key_file = "master.key"
[smtp]
listen = "{HOST}:{smtp_port}"
hostname = "care.bench.localhost"
max_message_bytes = {MAX_MESSAGE}
[relay]
url = "smtp://{HOST}:{relay_port}"
retry_delays = [1]
timeout = 30
[acknowledge]
# every bench customer writes from customer.example: the per-domain and overall caps would stop the acks
max_per_domain_per_hour = 10000000
max_per_hour = 10000000
[web]
listen = "{HOST}:{web_port}"
verification = "off"
[admin]
listen = "{HOST}:{admin_port}"
[[sites]]
id = "ticketnest"
name = "TicketNest"
domain = "{CARE.split('@')[1]}"
care_address = "{CARE}"
staff = ["{STAFF}"]
""")
    return path, smtp_port


class LogWatch:
    """Reads the daemon's log lines as they come; counts deliveries and notes when answers' purges committed."""

    _DELIVERED = re.compile(rb"mail_delivered case=(\w+) kind=(\w+)")
    _COMMITTED = re.compile(rb"inbound_committed \S+ cases=(\S+)")
    _EVENT = re.compile(rb" (ERROR|WARNING) (\S+) (\S+)")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.delivered: Counter[str] = Counter()
        self.last: dict[str, float] = {}  # kind -> when the latest delivery line was read
        self.answer_purged: dict[str, float] = {}  # case id -> when its answer's purge was logged
        self.committed = 0  # inbound messages the daemon logged as committed
        self.problems: Counter[str] = Counter()
        self.tail: deque[str] = deque(maxlen=30)

    def feed(self, line: bytes, t: float) -> None:
        self.tail.append(line.decode(errors="replace").rstrip())
        if m := self._DELIVERED.search(line):
            kind = m.group(2).decode()
            with self.cond:
                self.delivered[kind] += 1
                self.last[kind] = t
                if kind == "answer":
                    self.answer_purged[m.group(1).decode()] = t
                self.cond.notify_all()
        elif m := self._COMMITTED.search(line):
            self.committed += m.group(1).count(b",") + 1
        elif m := self._EVENT.search(line):
            self.problems[f"{m.group(1).decode()} {m.group(3).decode()}"] += 1

    def wait(self, want: dict[str, int], timeout: float) -> bool:
        """Until at least `want[kind]` deliveries of each kind were logged; False after `timeout`."""
        with self.cond:
            return self.cond.wait_for(lambda: all(self.delivered[k] >= n for k, n in want.items()), timeout)


class BenchDaemon(Server):
    """`python -m careservice run` on a generated config in `root`, relaying to `relay_port`; the code
    from `repo` (another worktree, for A/B runs of bench.ab)."""

    def __init__(self, root: Path, relay_port: int, env: dict[str, str] | None = None, repo: Path = REPO,
                 settings: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.repo = repo
        self.config, self.port = write_config(root, relay_port)
        text = self.config.read_text()
        for key, value in (settings or {}).items():  # "table.key" -> a TOML value, e.g. '"uvloop"'
            table, _, name = key.partition(".")
            text = text.replace(f"[{table}]\n", f"[{table}]\n{name} = {value}\n", 1)
        self.config.write_text(text)
        self.env = env or {}
        self.log = LogWatch()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> BenchDaemon:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "careservice", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root,
            env={**os.environ, **tree_env(self.repo), **self.env},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_port(self.port, lambda: self._proc is not None and self._proc.poll() is None)
        except RuntimeError:
            self.stop()
            raise RuntimeError("careservice did not start: " + " | ".join(list(self.log.tail)[-5:])) from None
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self.log.feed(line, time.monotonic())

    def drain(self, cases: int, what: str) -> None:
        """Wait until `cases` forwards and acks have been delivered in all."""
        if not self.log.wait({"forward": cases, "ack": cases}, DRAIN_TIMEOUT):
            raise RuntimeError(f"{what}: delivered {dict(self.log.delivered)} of {cases} cases after "
                               f"{DRAIN_TIMEOUT} s; log: {' | '.join(list(self.log.tail)[-3:])}")

    def cpu(self) -> float:
        """CPU seconds of the daemon and its worker processes."""
        return cpu_seconds(self.pid, tree=True)

    def rss(self) -> int:
        """Resident memory of the daemon and its worker processes together."""
        return rss_bytes(self.pid, tree=True)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None


@contextmanager
def careservice(relay: Server, workers: int = 1) -> Iterator[BenchDaemon]:
    """A fresh daemon (own data dir) relaying to `relay`, with `workers` worker processes."""
    settings = {"service.workers": str(workers)} if workers != 1 else {}
    with tempfile.TemporaryDirectory(prefix="careservice-bench-") as tmp, \
            BenchDaemon(Path(tmp), relay.port, settings=settings) as d:
        yield d
