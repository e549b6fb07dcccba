"""Composition root: build every part from the config, run them in one loop, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from careservice.addresses import Addressing
from careservice.config import Config
from careservice.context import Context
from careservice.crypto import Keyring, load_master_key
from careservice.intake.imap import ImapIntake
from careservice.intake.ingest import Ingest
from careservice.intake.smtp import SmtpHandler, start_smtp
from careservice.model import CaseState, OutgoingMail
from careservice.outbox import Outbox, Relay
from careservice.runner import Runner
from careservice.store import QueuedMail, Store
from careservice.texts import Texts
from handlers import STAGES

log = logging.getLogger("careservice.daemon")
SWEEP_SECONDS = 60


def read_secret(path: str, env: str) -> str:
    """A secret from the environment variable `env`, else from the file `path` ("" if neither)."""
    if env in os.environ:
        return os.environ[env]
    return Path(path).read_text().strip() if path else ""


class Service:
    """All parts of one running daemon, wired together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        keyring = Keyring(load_master_key(config.master_key_file, create=True))
        self.store = Store(config.data_dir, keyring)
        self.ctx = Context(config, self.store, Addressing(config.sites, keyring), keyring,
                           Texts(config.templates_dir), time.time)
        relay = Relay(config.relay, read_secret(config.relay.password_file, "CARESERVICE_RELAY_PASSWORD"))
        self.outbox = Outbox(config.relay, self.store, relay, time.time, self.answer_failed_notice)
        self.runner = Runner(self.ctx, STAGES, {CaseState.OPEN: config.unanswered_days * 86400.0},
                             self.outbox.wake)
        self.ingest = Ingest(self.store, config.data_dir, config.smtp.min_free_bytes, self.wake, time.time)
        self.imap = ImapIntake(config, self.ingest, keyring)
        self.servers: list[asyncio.Server] = []
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
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.start()
        self.servers.append(await start_smtp(self.config.smtp, SmtpHandler(self.config.smtp,
                                                                           self.ctx.addressing, self.ingest)))
        self.tasks = [asyncio.create_task(self.runner.run()), asyncio.create_task(self.outbox.run())]
        self.imap.start()
        self.scheduler.add_job(self.sweep, "interval", seconds=SWEEP_SECONDS, id="retention_and_retry_sweep")
        self.scheduler.start()
        log.info("started smtp=%s:%d sites=%d", self.config.smtp.listen.host, self.config.smtp.listen.port,
                 len(self.config.sites))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        await self.imap.stop()
        self.scheduler.shutdown(wait=False)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.store.close()
        log.info("stopped")


async def run_forever(config: Config) -> None:
    service = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    print(f"careservice running: smtp {config.smtp.listen.host}:{config.smtp.listen.port}, "
          f"relay {config.relay.url}", flush=True)
    await stop.wait()
    await service.stop()
