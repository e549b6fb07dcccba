"""A case worker process (`careservice worker`, started by the daemon): stages and outbox over the store.

The daemon starts `service.workers` of them, worker I of N taking the cases and mail of its shard
(careservice.store.shards; on PostgreSQL its own claims); the jobs of the whole store (the sweep, the
daily digest, the WAL checkpoints) run in worker 0 alone. Each stops when its stdin (the daemon's
pipe) closes or on SIGTERM/SIGINT, after the batch of cases, the relay delivery and the scheduled job
in flight, so a mail the relay took is always recorded as sent. SIGHUP
reloads the sites, staff lists and templates. While its loops run it writes a heartbeat byte to
stdout, which the daemon's systemd watchdog relies on. Each minute worker 0 also sends the daily
digest once it is due (handlers.digest).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from careservice import workerlock
from careservice.bootstrap import build_context, read_secret
from careservice.budget import Budget
from careservice.config import RELAY_PASSWORD_ENV, Config, ConfigError
from careservice.dkim import Signer
from careservice.handlers import DIGEST, EVENTS, STAGES
from careservice.handlers.digest import due_day
from careservice.logs import error_fields
from careservice.model import CaseState, DeliveryFailure, MailEvent, Outcome, QueuedMail
from careservice.outbox import Outbox, Relay
from careservice.reload import reload_config
from careservice.runner import Runner
from careservice.store.schema import connect
from careservice.store.shards import ONE

log = logging.getLogger("careservice.worker")
SWEEP_SECONDS = 60
HEARTBEAT_SECONDS = 1.0
NICENESS = 10
WAL_CHECK_SECONDS = 0.25
WAL_CHECKPOINT_BYTES = 1000 * 4096  # SQLite's own autocheckpoint threshold (1,000 pages)


class WalCheckpointer:
    """Copies the WALs into cases.db and keys.db from a thread of its own, outside data_dir/write.lock.

    SQLite's automatic checkpoint ran inside whichever commit crossed 1,000 pages (about 85 cases), in
    the intake's group commit or in the worker's apply, holding write.lock while it copied the pages
    and synced the database file, so every commit of the other process waited behind it. Both
    processes' connections now turn it off (careservice.store.schema). A PASSIVE checkpoint changes
    nothing either file holds, and SQLite lets writers go on meanwhile, so it needs none of our lock;
    the purges' TRUNCATE checkpoints stay under the lock, where they were.

    Within WAL_CHECKPOINT_BYTES of smtp.min_free_bytes, and below it, it copies every new frame at
    once. A frame left in the WAL holds its space twice over: in the WAL now, and in cases.db when a
    checkpoint copies it in. On a disk that filled up, the WAL's backlog ate the headroom kept for
    staff answers: the answer's purge could not checkpoint (SQLITE_FULL), so the WAL could not be
    reset, and the case stayed until someone freed space. Copied in while there is room for it, the
    WAL is reset: the next commits write over its file, and it is truncated to what they wrote.
    """

    def __init__(self, data_dir: Path, min_free_bytes: int) -> None:
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes
        self._copied: tuple[object, ...] | None = None  # _due() as of the last checkpoint that need not run again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="careservice-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (not with a PostgreSQL store)
            await asyncio.to_thread(self._thread.join)

    def _due(self) -> tuple[object, ...] | None:
        """None when no checkpoint is due, else the WALs' sizes and times and the free space now: a
        checkpoint done or failed is not tried again until a commit or freed space changes those."""
        wals = []
        for name in ("cases.db-wal", "keys.db-wal"):
            try:
                wal = os.stat(self.data_dir / name)
            except FileNotFoundError:
                continue
            wals.append((wal.st_size, wal.st_mtime_ns))
        if not any(size for size, _ in wals):
            return None
        free = shutil.disk_usage(self.data_dir).free
        now = (wals, free)
        big = any(size >= WAL_CHECKPOINT_BYTES for size, _ in wals)
        return now if (big or free < self.min_free_bytes + WAL_CHECKPOINT_BYTES) and now != self._copied else None

    def _run(self) -> None:
        try:
            conn = connect(self.data_dir, durable=False)
        except sqlite3.Error as exc:  # the store opened for the worker a moment ago: checkpoints wait for a restart
            log.error("wal_checkpointer_not_started error=%s", type(exc).__name__)
            return
        try:
            while not self._stop.wait(WAL_CHECK_SECONDS):
                due = self._due()
                if due is None:
                    continue
                try:
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # every file
                except sqlite3.Error as exc:  # tried again once a commit or freed space changes; the sweep truncates
                    log.warning("wal_checkpoint_failed error=%s", exc.sqlite_errorname)
                    self._copied = due
                else:
                    self._copied = due if not busy and frames == copied else None
        finally:
            conn.close()


class CaseWorker:
    """The stages and the outbox over the shared store, in this process's one thread."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time, shard: tuple[int, int] = ONE) -> None:
        self.config = config
        self.shard = shard
        self.first = shard[0] == 0  # runs the jobs of the whole store
        self.ctx, self.store = build_context(config, intake=False, shard=shard)
        self.ctx.clock = clock  # the one clock of stages, outbox and digest: a test sets the day and hour
        relay = Relay(config.relay, read_secret(config.relay.password_file, RELAY_PASSWORD_ENV),
                      Signer.load(config.sites))
        budget = Budget.of(config.worker_memory_mb)
        self.outbox = Outbox(config.relay, self.store, relay, clock, self.on_event, budget.mail)
        self.runner = Runner(self.ctx, self.store, STAGES, {CaseState.OPEN: config.unanswered_days * 86400.0},
                             self.outbox.wake, budget.cases)
        self.tasks: list[asyncio.Task[None]] = []
        self.listener: asyncio.Task[None] | None = None  # other nodes' commits (PostgreSQL)
        self.scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "misfire_grace_time": SWEEP_SECONDS})
        self.jobs: set[asyncio.Task[object]] = set()  # the scheduler's jobs running now: a stop lets them end
        self.checkpointer = WalCheckpointer(config.data_dir, config.smtp.min_free_bytes)

    def wake(self) -> None:
        self.runner.wake()
        self.outbox.wake()

    @property
    def healthy(self) -> bool:
        return bool(self.tasks) and not any(task.done() for task in self.tasks)

    async def sweep(self) -> None:
        """Periodic, and once at start: purge every case past retention.hard_limit_days (one that expiry
        cannot reach, e.g. of a site removed from the config), run due expiries and retries, drop past
        days' digests and expired "#spam" blocks, sweep what a crash between the two databases' commits
        left (PostgreSQL: any node's), re-wrap keys still under a previous master key while one is kept,
        and truncate the WAL."""
        now = self.ctx.clock()
        sites = frozenset(site.id for site in self.ctx.config.sites)
        for case_id, state, created in await self.store.purge_older_than(now - self.config.hard_limit_days * 86400.0,
                                                                         sites, now):
            log.warning("case_purged_hard_limit case=%s state=%s age_days=%d", case_id, state, (now - created) // 86400)
        self.wake()
        await self.store.rotate_digests(now)
        await self.store.prune_blocks(now)
        await self.store.sweep_orphans(now)
        if self.store.keyring.rotating:  # keys a node still on the old master key wrapped since the rotation
            await self.store.rewrap_keys()

    async def send_digests(self) -> None:
        """Each site's digest of the day, once `[digest] at` has passed on the context's clock (local time),
        unless it went already (the day is stored with the queued mail, so a restart does not repeat it)."""
        now = self.ctx.clock()
        day = due_day(self.ctx.config.digest_at, now)
        for site in self.ctx.config.sites if day else ():
            try:
                if await self.store.digest_day(site.id) == day:
                    continue
                cases = await self.store.open_for_digest(site.id)
                # filed under a key of its own, not the key of a case it lists: that case's purge would take
                # the digest with it before the relay had it
                filed_under = secrets.token_hex(6)
                mails = DIGEST(site, cases, now, self.ctx, filed_under)
                if await self.store.queue_digest(site.id, day, filed_under, mails, now):
                    log.info("digest_queued site=%s cases=%d mails=%d", site.id, len(cases), len(mails))
                    self.outbox.wake()
            except Exception as exc:  # the next minute tries again; the other sites go on
                log.error("digest_failed site=%s %s", site.id, error_fields(exc))

    async def renew_claims(self) -> None:
        await self.store.renew_claims(self.runner.busy, self.outbox.holding(), self.ctx.clock())

    def reload(self) -> None:
        """SIGHUP: the config as careservice.reload applies it, the sites' DKIM keys read again, and the
        relay's OAuth2 token asked for again after a refusal."""
        config = reload_config(self.ctx)
        if config is None:
            return
        self.config = config
        self.outbox.relay.rearm()
        try:
            self.outbox.relay.signer = Signer.load(config.sites)
        except ConfigError as exc:  # changed since the reload's check passed: keep signing with the keys in force
            log.error("dkim_keys_kept key=%s (the new ones did not load; `careservice check` says why)", exc.key)

    def on_event(self, event: MailEvent, item: QueuedMail, failure: DeliveryFailure | None) -> Outcome | None:
        """The workflow's outcome of the relay's word on an answer (handlers.EVENTS); None for a case of a
        site no longer configured (the hard age limit purges it)."""
        site = self.ctx.config.site(item.site)
        return None if site is None else EVENTS[event](site, item, failure, self.ctx)

    async def start(self) -> None:
        await self.store.start(sweep=True)  # a worker killed inside a purge's commit left its key behind
        if self.first and not self.config.store.shared:  # PostgreSQL checkpoints on its own
            self.checkpointer.start()
        self.tasks = [asyncio.create_task(self.runner.run()), asyncio.create_task(self.outbox.run())]
        self.listener = asyncio.create_task(self.store.listen(self.wake))
        if self.first:
            self._every(SWEEP_SECONDS, self.sweep, "retention_and_retry_sweep", now=True)
            self._every(SWEEP_SECONDS, self.send_digests, "daily_digest", now=True)
        self._every(SWEEP_SECONDS, self.outbox.check_relay, "relay_check")
        if self.config.store.shared:  # claims outlive a slow batch only while this process renews them
            self._every(self.config.store.lease_seconds / 3, self.renew_claims, "claim_renewal")
        self.scheduler.start()
        log.info("worker_started index=%d of=%d", *self.shard)

    def _every(self, seconds: float, job: Callable[[], Awaitable[None]], name: str, now: bool = False) -> None:
        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            self.jobs.add(task)
            try:
                await job()
            finally:
                self.jobs.discard(task)

        first = {"next_run_time": datetime.now(UTC)} if now else {}  # else one interval after the start
        self.scheduler.add_job(run, "interval", seconds=seconds, id=name, name=name, **first)

    async def stop(self, timeout: float) -> None:
        """Finish the cases, the delivery and the scheduler's jobs in flight (at most `timeout` seconds), then
        close the store. The scheduler's shutdown cancels a job still running, which it logs as an error."""
        self.scheduler.pause()
        await asyncio.sleep(0)  # a job the scheduler started in this turn takes its first step and counts as running
        if self.listener is not None:
            self.listener.cancel()
        self.runner.stop()
        self.outbox.stop()
        running = [*self.tasks, *self.jobs]
        done, pending = await asyncio.wait(running, timeout=timeout) if running else (set(), set())
        self.scheduler.shutdown(wait=False)
        for task in pending:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await self.checkpointer.stop()
        await self.store.close()
        log.info("worker_stopped unfinished=%d", len(pending))


async def run_worker(config: Config, shard: tuple[int, int] = ONE) -> None:
    """The child process: hold its worker lock, run until stdin closes or a stop signal arrives.

    It runs at a lower CPU priority: under a burst the listeners' 250s come first and the worker
    catches up afterwards (the committed backlog is safe in the store).
    """
    os.nice(NICENESS)
    lock = await asyncio.to_thread(workerlock.hold, config.data_dir, shard[0])
    worker = CaseWorker(config, shard=shard)
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGHUP, worker.reload)
    if stat.S_ISFIFO(os.fstat(1).st_mode):
        os.set_blocking(1, False)  # a beat must never block the loop
    beating = asyncio.create_task(_heartbeat(worker, done))
    await done.wait()
    beating.cancel()
    await worker.stop(config.stop_timeout * 0.8)  # the daemon kills a worker still busy at stop_timeout
    os.close(lock)


async def _heartbeat(worker: CaseWorker, done: asyncio.Event) -> None:
    """A byte on stdout each second while the loops run: the daemon's watchdog pings only then."""
    while not done.is_set():
        if worker.healthy:
            try:
                os.write(1, b".")
            except BlockingIOError:
                pass  # the daemon is behind reading; the next beat will do
            except OSError:
                return  # the daemon is gone; stdin's EOF stops us
        await asyncio.sleep(HEARTBEAT_SECONDS)
