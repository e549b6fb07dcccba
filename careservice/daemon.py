"""Composition root of the intake process: listeners, IMAP, the worker children; start, reload, drain.

SIGTERM/SIGINT drain within service.stop_timeout: the listeners stop accepting, SMTP sessions get
421 at their next command while a DATA in progress is committed and answered, the form and IMAP
finish their current item, and each worker finishes the delivery in flight. SIGHUP reloads what can
change without a restart (careservice.reload). Under systemd the service manager hears of each
step through $NOTIFY_SOCKET, and of our health through the watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from careservice import metrics
from careservice.admin import AdminServer, Parts, start_admin
from careservice.bootstrap import build_context
from careservice.config import Config
from careservice.intake.imap import ImapIntake
from careservice.intake.ingest import Ingest
from careservice.intake.smtp import SmtpHandler, SmtpListener, start_smtp
from careservice.intake.spamcheck import SpamCheck
from careservice.intake.web import WebServer, start_web
from careservice.logs import error_fields
from careservice.notify import Notifier
from careservice.reload import reload_config
from careservice.supervisor import WorkerSupervisor

log = logging.getLogger("careservice.daemon")
ROTATE_SECONDS = 60
FORM_STATS_SECONDS = 5  # the form's results go to the daily statistics in one write per interval, not per post
STOP_MARGIN = 2.0  # of stop_timeout, kept for closing the store and the worker's last word


class Service:
    """The daemon's main process: owns the listeners and the intake, and supervises the workers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx, self.store = build_context(config, intake=True)
        self.worker = WorkerSupervisor(config)
        self.ingest = Ingest(self.store, config.data_dir, config.smtp.min_free_bytes, self.worker.wake, time.time)
        self.spam = SpamCheck(config.spam)
        self.imap = ImapIntake(config, self.ingest, self.spam)
        self.smtp: SmtpListener | None = None
        self.web: WebServer | None = None
        self.admin: AdminServer | None = None
        self.rotation: asyncio.Task[None] | None = None
        self.form_stats: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.worker.healthy

    async def start(self) -> None:
        self.config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        await self.store.start(sweep=True)
        await self.worker.start()
        self.smtp = await start_smtp(self.config.smtp, SmtpHandler(self.config.smtp, self.ctx.addressing,
                                                                   self.ingest, self.spam))
        self.web = await start_web(self.config, self.ctx, self.ingest, self.spam)
        metrics.initialise(site.id for site in self.config.sites)
        self.admin = await start_admin(Parts(self.ctx, self.worker, self.ingest, self._smtp_accepting))
        self.imap.start()
        self.rotation = asyncio.create_task(self._rotate_digests())
        self.form_stats = asyncio.create_task(self._form_stats())
        log.info("started smtp=%s:%d web=%s:%d sites=%d", self.config.smtp.listen.host, self.config.smtp.listen.port,
                 self.config.web.listen.host, self.config.web.listen.port, len(self.config.sites))

    async def _rotate_digests(self) -> None:
        """The intake's digests (de-duplication) follow the day too (see Store.rotate_digests)."""
        while True:
            await asyncio.sleep(ROTATE_SECONDS)
            try:
                await self.store.rotate_digests(time.time())
            except Exception as exc:  # the store is failing: the intake answers 451 meanwhile, retry later
                log.error("digest_rotation_failed %s", error_fields(exc))

    def _smtp_accepting(self) -> bool:
        return self.smtp is not None and self.smtp.server.is_serving() and not self.smtp.sessions.draining

    async def _form_stats(self) -> None:
        while True:
            await asyncio.sleep(FORM_STATS_SECONDS)
            await self._store_form_tally()

    async def _store_form_tally(self) -> None:
        """Add the form's results counted since the last time to the daily statistics."""
        tally = metrics.take_form_tally()
        if not tally:
            return
        try:
            await self.store.add_stats(tally)
        except Exception as exc:  # the store is failing: keep the counts for the next attempt
            metrics.restore_form_tally(tally)
            log.error("form_stats_failed %s", error_fields(exc))

    def reload(self) -> bool:
        if reload_config(self.ctx) is None:
            return False
        self.imap.rearm()
        self.worker.reload()
        return True

    async def stop(self) -> None:
        """Drain (see the module text) and close; at most stop_timeout seconds."""
        self.worker.stopping = True
        for task in (self.rotation, self.form_stats):
            if task is not None:
                task.cancel()
        started = time.monotonic()
        budget = max(self.config.stop_timeout - STOP_MARGIN, 1.0)
        intake = [self.imap.stop()]
        if self.smtp is not None:
            intake.append(self.smtp.drain(budget))
        if self.web is not None:
            intake.append(self.web.stop())
        if self.admin is not None:
            intake.append(self.admin.stop())
        await asyncio.gather(self.worker.stop(budget), *intake)
        await self._store_form_tally()
        await self.spam.close()
        await self.store.close()
        log.info("stopped seconds=%.1f", time.monotonic() - started)


async def run_forever(config: Config) -> None:
    notifier = Notifier.from_env()
    service = Service(config)
    await service.start()
    print(f"careservice running: smtp {config.smtp.listen.host}:{config.smtp.listen.port}, "
          f"relay {config.relay.url}", flush=True)
    notifier.ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        service.worker.stopping = True  # at once: a worker that got the same signal must not be restarted
        notifier.stopping()
        stop.set()

    def on_reload() -> None:
        notifier.reloading()
        service.reload()
        notifier.ready()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    watchdog = asyncio.create_task(_watchdog(notifier, service))
    await stop.wait()
    watchdog.cancel()
    await service.stop()


async def _watchdog(notifier: Notifier, service: Service) -> None:
    """WATCHDOG=1 at half the interval systemd asked for, only while this loop and every worker are healthy."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        if service.healthy:
            notifier.watchdog()
        else:
            log.warning("watchdog_withheld reason=worker_unhealthy")
        await asyncio.sleep(interval)
