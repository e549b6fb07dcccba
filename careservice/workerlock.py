"""The worker processes' locks in data_dir: one per index, so that two workers never take the same cases.

Worker I holds worker.lock (I = 0) or worker-I.lock exclusively while it runs; a restarted worker
waits for its predecessor's. A daemon that starts waits for every lock first: workers of the
previous run (which stop when they read EOF on their pipe) may still be finishing a batch, and
with a changed `service.workers` their shards are not the new ones.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("careservice.workerlock")
LOCK_WAIT = 30.0


def lock_path(data_dir: Path, index: int) -> Path:
    return data_dir / (f"worker-{index}.lock" if index else "worker.lock")


def hold(data_dir: Path, index: int) -> int:
    """Wait (bounded) for worker `index`'s exclusive lock and keep it (the open descriptor)."""
    fd = os.open(lock_path(data_dir, index), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _take(fd, time.monotonic() + LOCK_WAIT)
    except BaseException:
        os.close(fd)
        raise
    return fd


def previous_gone(data_dir: Path) -> None:
    """Wait (bounded) until no worker of an earlier run holds any worker lock."""
    deadline = time.monotonic() + LOCK_WAIT
    for path in sorted(data_dir.glob("worker*.lock")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            _take(fd, deadline)
        except BlockingIOError:  # each new worker still waits for its own index's lock
            log.warning("previous_worker_still_running lock=%s", path.name)
        finally:
            os.close(fd)  # releases it


def _take(fd: int, deadline: float) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
