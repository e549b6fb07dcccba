"""A wake-up signal for the background loops (runner, outbox)."""

from __future__ import annotations

import asyncio
import contextlib


class Wakeup:
    """`set()` from anywhere in the loop; `wait(timeout)` returns when set or after `timeout` seconds.

    Uses asyncio.timeout rather than asyncio.wait_for: on Python 3.11 wait_for can swallow a
    cancellation that arrives together with the event, which left a stopping worker looping.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
        self._event.clear()
