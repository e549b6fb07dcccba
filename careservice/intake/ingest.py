"""The single entry for inbound mail: commit durably, then wake the stage runner."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from careservice import metrics
from careservice.intake.headers import message_key
from careservice.model import NewMessage
from careservice.store import Store

log = logging.getLogger("careservice.intake")
DISK_CHECK_INTERVAL = 0.25


class Ingest:
    def __init__(self, store: Store, data_dir: Path, min_free_bytes: int, on_commit: Callable[[], None],
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes
        self.on_commit = on_commit
        self.clock = clock
        self._disk_checked = -DISK_CHECK_INTERVAL
        self._free = 0
        self._waking = False  # a wake of the worker is due at the next turn of the loop

    def free_bytes(self) -> int:
        """Free space under data_dir (re-read at most 4x a second)."""
        now = time.monotonic()
        if now - self._disk_checked > DISK_CHECK_INTERVAL:
            self._free = shutil.disk_usage(self.data_dir).free
            self._disk_checked = now
        return self._free

    def disk_low(self) -> bool:
        """True when free space under data_dir is below the configured floor."""
        return self.free_bytes() < self.min_free_bytes

    def dedupe_key(self, site: str, raw: bytes) -> bytes:
        """The keyed digest that recognises a message taken before (see careservice.intake.headers)."""
        return self.store.keyring.digest(message_key(site, raw))

    async def mailbox_health(self, name: str, problem: str) -> None:
        """Record an IMAP mailbox's health for `status --json` ("" = working; else a short code)."""
        await self.store.mailbox_health(name, problem, self.clock())

    def _wake(self) -> None:
        self._waking = False
        self.on_commit()

    async def accept(self, messages: list[NewMessage], source: str) -> list[str]:
        """Commit `messages` in one transaction; returns ids ('' = duplicate). Raises if not committed."""
        started = time.monotonic()
        ids = await self.store.add_inbound(messages, self.clock())
        metrics.received(source, len(messages), time.monotonic() - started)
        if not self._waking:  # the messages of one group commit go on in one turn: one wake for them all
            self._waking = True
            asyncio.get_running_loop().call_soon(self._wake)
        log.info("inbound_committed source=%s cases=%s", source, ",".join(i or "duplicate" for i in ids))
        return ids
