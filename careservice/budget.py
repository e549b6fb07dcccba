"""The worker's memory budget (service.worker_memory_mb) as byte limits on its batches.

The runner and the outbox choose each batch by the size of the stored, still sealed rows, so that a
burst of large mail is taken a few messages at a time, however many are waiting, and small cases
queued behind it fill the rest of the next batch instead of waiting for the whole burst.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

MB = 1024 * 1024
IDLE_MB = 64  # the worker before any batch: interpreter, libraries, SQLite's cache, with some room
# Peak memory per stored byte, measured with one large mail at a time, where it is highest: a batch
# of several holds the transient copies of only one of them at once.
CASE_COPIES = 7  # runner: open, parse, decode attachments, render the forward, seal it
MAIL_COPIES = 8  # outbox: open, then the relay client's copies and its send buffer
CASE_SHARE = 0.5  # of the memory above IDLE_MB; the outbox has the rest (both run at once)


def min_memory_mb(max_message_bytes: int) -> int:
    """The smallest budget that holds one message of the largest size in the runner and the outbox at once."""
    return IDLE_MB + math.ceil((CASE_COPIES + MAIL_COPIES) * max_message_bytes / MB)


@dataclass(frozen=True)
class Budget:
    cases: int  # stored bytes of cases one runner batch may take
    mail: int  # stored bytes of queued mail one outbox round may take

    @classmethod
    def of(cls, memory_mb: int) -> Budget:
        spare = (memory_mb - IDLE_MB) * MB
        return cls(int(spare * CASE_SHARE / CASE_COPIES), int(spare * (1 - CASE_SHARE) / MAIL_COPIES))


SCAN = 4  # rows looked at per row wanted: a batch closed by bytes fills up with the small ones behind


def first_fit(sized: Iterable[tuple[T, int]], limit: int, max_bytes: int) -> list[T]:
    """At most `limit` items, in their order, whose sizes add up to at most `max_bytes`; an item that
    does not fit is skipped for a later one that does. The first is always taken, however large, so
    every item comes first in its turn."""
    taken: list[T] = []
    total = 0
    for item, size in sized:
        if taken and total + size > max_bytes:
            continue
        taken.append(item)
        total += size
        if len(taken) == limit:
            break
    return taken
