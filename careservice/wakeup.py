"""Wake-up signals for the background loops (runner, outbox), and a gate that lets tasks on together."""

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


class Gate:
    """Lets its waiters on together, in one turn of the loop: once `expected` of them wait, or `linger`
    seconds after the first began to. A store call made right after `passage()` by each of them then
    joins one transaction (the inline executor commits the calls of one turn together)."""

    def __init__(self, expected: int, linger: float) -> None:
        self.expected = expected
        self.linger = linger
        self._waiting: list[asyncio.Future[None]] = []  # a future each: a waiter cancelled cancels only its own
        self._timer: asyncio.TimerHandle | None = None

    async def passage(self) -> None:
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        self._waiting.append(mine)
        if len(self._waiting) >= self.expected:
            self._release()
            await asyncio.sleep(0)  # on in the next turn, with the others whose wake-ups the release queued
            return
        if self._timer is None:  # the linger runs only while someone waits
            self._timer = loop.call_later(self.linger, self._release)
        await mine

    def leave(self) -> None:
        """One of the expected will not come again: the others need not wait for it."""
        self.expected -= 1
        if self._waiting and len(self._waiting) >= self.expected:
            self._release()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        waiting, self._waiting, self._timer = self._waiting, [], None
        for future in waiting:
            if not future.done():
                future.set_result(None)
