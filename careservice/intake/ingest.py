"""The single entry for inbound mail: commit durably, then wake the stage runner."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from careservice.store import NewMessage, Store

log = logging.getLogger("careservice.intake")


class Ingest:
    def __init__(self, store: Store, data_dir: Path, min_free_bytes: int, on_commit: Callable[[], None],
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes
        self.on_commit = on_commit
        self.clock = clock

    def disk_low(self) -> bool:
        """True when free space under data_dir is below the configured floor."""
        return shutil.disk_usage(self.data_dir).free < self.min_free_bytes

    async def accept(self, messages: list[NewMessage], source: str) -> list[str]:
        """Commit `messages` in one transaction; returns ids ('' = duplicate). Raises if not committed."""
        ids = await self.store.add_inbound(messages, self.clock())
        self.on_commit()
        log.info("inbound_committed source=%s cases=%s", source, ",".join(i or "duplicate" for i in ids))
        return ids
