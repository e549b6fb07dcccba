"""Wake-ups across nodes: a commit that made a case or a mail due sends NOTIFY (pg.executor); every
worker LISTENs and wakes its loops. A lost notification only delays work to the loops' own poll."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg

from careservice.store.pg.executor import CHANNEL, CONNECT_TIMEOUT

log = logging.getLogger("careservice.store")
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


async def listen(url: str, on_wake: Callable[[], None]) -> None:
    """Call `on_wake` at each notification, for ever; reconnects (backing off) while the database is away."""
    delay = RETRY_FIRST
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
            async with conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                delay = RETRY_FIRST
                on_wake()  # what became due while nobody listened
                # aclosing: leaving a bare `async for` over notifies() left the connection's close hanging
                async with contextlib.aclosing(conn.notifies()) as notes:
                    async for _ in notes:
                        on_wake()
        except psycopg.Error as exc:
            log.warning("pg_listen_failed error=%s retry_in=%.0fs", type(exc).__name__, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)
