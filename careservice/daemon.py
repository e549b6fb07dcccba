"""Composition root: build every part from the config, run them in one loop, stop cleanly."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from careservice.addresses import Addressing
from careservice.config import RELAY_PASSWORD_ENV, Config
from careservice.context import Context
from careservice.crypto import Keyring, load_master_key
from careservice.handlers import STAGES
from careservice.intake.imap import ImapIntake
from careservice.intake.ingest import Ingest
from careservice.intake.smtp import SmtpHandler, start_smtp
from careservice.intake.web import WebServer, start_web
from careservice.model import CaseState, OutgoingMail
from careservice.outbox import Outbox, Relay
from careservice.runner import Runner
from careservice.store import QueuedMail, Store
from careservice.texts import Texts

log = logging.getLogger("careservice.daemon")
SWEEP_SECONDS = 60
WORKER_RESTART_DELAY = 1.0
WORKER_STOP_TIMEOUT = 15.0
WORKER_NICENESS = 10


def read_secret(path: str, env: str) -> str:
    """A secret from the environment variable `env`, else from the file `path` ("" if neither)."""
    if env in os.environ:
        return os.environ[env]
    return Path(path).read_text().strip() if path else ""


def build_context(config: Config, intake: bool) -> Context:
    """The store and everything keyed by the master key, as both processes need them.

    Only the intake process creates a missing master key, and only its commits must be on disk
    before they are answered; the worker's store runs inline (see careservice.store).
    """
    keyring = Keyring(load_master_key(config.master_key_file, create=intake))
    store = Store(config.data_dir, keyring, durable=intake, inline=not intake)
    return Context(config, store, Addressing(config.sites, keyring), keyring, Texts(config.templates_dir),
                   time.time)


class Worker:
    """The case-processing process: runs the stages and the outbox over the shared store."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx = build_context(config, intake=False)
        self.store = self.ctx.store
        relay = Relay(config.relay, read_secret(config.relay.password_file, RELAY_PASSWORD_ENV))
        self.outbox = Outbox(config.relay, self.store, relay, time.time, self.answer_failed_notice)
        self.runner = Runner(self.ctx, STAGES, {CaseState.OPEN: config.unanswered_days * 86400.0},
                             self.outbox.wake)
        self.tasks: list[asyncio.Task[None]] = []
        self.scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "misfire_grace_time": SWEEP_SECONDS})

    def wake(self) -> None:
        self.runner.wake()
        self.outbox.wake()

    async def sweep(self) -> None:
        """Periodic: run due expiries and retries, and truncate the WAL."""
        self.wake()
        await self.store.checkpoint()

    def answer_failed_notice(self, item: QueuedMail, why: str) -> OutgoingMail | None:
        site = self.config.site(item.site)
        if site is None:
            return None
        return self.ctx.notice(site, item.mail.case_id, item.mail.case_id, site.staff,
                               "Answer could not be delivered", f"The answer was not delivered: {why}. "
                               "The case is open again; reply to the forwarded case to try again.")

    async def start(self) -> None:
        await self.store.start(sweep=True)  # a worker killed inside a purge's commit left its key behind
        self.tasks = [asyncio.create_task(self.runner.run()), asyncio.create_task(self.outbox.run())]
        self.scheduler.add_job(self.sweep, "interval", seconds=SWEEP_SECONDS, id="retention_and_retry_sweep")
        self.scheduler.start()
        log.info("worker_started")

    async def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.store.close()
        log.info("worker_stopped")


class WorkerProcess:
    """Starts `careservice worker` as a child, wakes it through its stdin, restarts it if it dies.

    The pipe is also its lifeline: when this process ends (even by kill -9) the child reads EOF
    and stops, so a restarted daemon never runs beside an orphaned worker for long.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self._pipe = -1
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Spawn the worker and wait (bounded) until it holds its lock, so the first cases are not kept
        waiting for its imports."""
        await self._spawn()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        while not _worker_lock_held(self.config.data_dir) and time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.returncode is not None:
                break  # the supervisor restarts it
            await asyncio.sleep(0.02)
        self._supervisor = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        read_end, self._pipe = os.pipe()
        os.set_blocking(self._pipe, False)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "careservice", "worker", "--config", str(self.config.path), stdin=read_end,
        )
        os.close(read_end)

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            log.error("worker_exited code=%s restarting_in=%s", code, WORKER_RESTART_DELAY)
            await asyncio.sleep(WORKER_RESTART_DELAY)
            old = self._pipe
            await self._spawn()
            os.close(old)  # only now: a closed fd's number goes to the next socket, and wake() would write there

    def wake(self) -> None:
        """Tell the worker that new cases are committed (a lost byte only delays it to its next poll)."""
        try:
            os.write(self._pipe, b"w")
        except (BlockingIOError, BrokenPipeError, OSError):
            pass

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        os.close(self._pipe)  # EOF: the worker finishes its round and exits
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), WORKER_STOP_TIMEOUT)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Service:
    """The daemon's main process: owns the listeners and the intake, and supervises the worker."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx = build_context(config, intake=True)
        self.store = self.ctx.store
        self.worker = WorkerProcess(config)
        self.ingest = Ingest(self.store, config.data_dir, config.smtp.min_free_bytes, self.worker.wake, time.time)
        self.imap = ImapIntake(config, self.ingest, self.ctx.keyring)
        self.servers: list[asyncio.Server] = []
        self.web: WebServer | None = None

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.start(sweep=True)
        await self.worker.start()
        self.servers.append(await start_smtp(self.config.smtp, SmtpHandler(self.config.smtp,
                                                                           self.ctx.addressing, self.ingest)))
        self.web = await start_web(self.config, self.ctx, self.ingest)
        self.imap.start()
        log.info("started smtp=%s:%d web=%s:%d sites=%d", self.config.smtp.listen.host, self.config.smtp.listen.port,
                 self.config.web.listen.host, self.config.web.listen.port, len(self.config.sites))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        if self.web is not None:
            await self.web.stop()
        await self.imap.stop()
        await self.store.close()
        await self.worker.stop()
        log.info("stopped")


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_forever(config: Config) -> None:
    service = Service(config)
    await service.start()
    print(f"careservice running: smtp {config.smtp.listen.host}:{config.smtp.listen.port}, "
          f"relay {config.relay.url}", flush=True)
    await _until_signal()
    await service.stop()


async def run_worker(config: Config) -> None:
    """The child process: hold the worker lock, run until stdin closes or a signal arrives.

    It runs at a lower CPU priority: under a burst the listeners' 250s come first and the worker
    catches up afterwards (the committed backlog is safe in the store).
    """
    os.nice(WORKER_NICENESS)
    lock = await asyncio.to_thread(_worker_lock, config.data_dir)
    worker = Worker(config)
    await worker.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_wake() -> None:
        if os.read(0, 4096):
            worker.wake()
        else:
            loop.remove_reader(0)
            done.set()

    loop.add_reader(0, on_wake)
    signals = asyncio.create_task(_until_signal())
    await asyncio.wait([signals, asyncio.create_task(done.wait())], return_when=asyncio.FIRST_COMPLETED)
    signals.cancel()
    await worker.stop()
    os.close(lock)


def _worker_lock_held(data_dir: Path) -> bool:
    """True while some worker holds data_dir's worker lock."""
    fd = os.open(data_dir / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


def _worker_lock(data_dir: Path) -> int:
    """Wait (bounded) for the exclusive worker lock: a previous worker may still be finishing."""
    fd = os.open(data_dir / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT * 2
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
