"""Which node polls an IMAP mailbox: the one holding its lease in the shared store.

Nodes sharing a PostgreSQL store would otherwise all drain the same mailbox. Each keeps asking for
the lease `imap:<mailbox>` every RENEW seconds; the holder keeps it, the others get it once the
holder has not renewed it for LEASE seconds (a dead node's mailbox moves within LEASE + RENEW, under
30 s). On SQLite the store grants every lease: one node.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from careservice.logs import error_fields
from careservice.store import Store

log = logging.getLogger("careservice.imap")
LEASE = 20.0
RENEW = 5.0


class MailboxLease:
    """`held` is set while this node may poll the mailbox (the mailbox's thread waits on it)."""

    def __init__(self, store: Store, mailbox: str) -> None:
        self.store = store
        self.name = f"imap:{mailbox}"
        self.held = threading.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        while True:
            try:
                held = await self.store.take_lease(self.name, LEASE, time.time())
            except Exception as exc:  # the store is away: so is our claim on the mailbox, soon
                log.warning("mailbox_lease_failed lease=%s %s", self.name, error_fields(exc))
                held = False
            if held != self.held.is_set():
                log.info("mailbox_lease lease=%s held=%s", self.name, held)
                (self.held.set if held else self.held.clear)()
            await asyncio.sleep(RENEW)

    async def release(self) -> None:
        """At a clean stop: another node may take the mailbox at once."""
        if self._task is not None:
            self._task.cancel()
        if self.held.is_set():
            self.held.clear()
            try:
                await self.store.drop_lease(self.name)
            except Exception as exc:  # it expires by itself
                log.warning("mailbox_lease_release_failed lease=%s %s", self.name, error_fields(exc))
