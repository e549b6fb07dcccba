"""The daemon's side of the worker processes: start them, wake them, hear their heartbeats, restart them, stop them."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time

from careservice import metrics, workerlock
from careservice.config import Config
from careservice.crypto import worker_environment

log = logging.getLogger("careservice.supervisor")
RESTART_DELAY = 1.0
START_WAIT = 15.0
HEALTHY_WITHIN = 3.0  # seconds since the last heartbeat for a worker to count as healthy


class WorkerChild:
    """One `careservice worker --index I --of N` child, woken through its stdin, restarted if it dies.

    The pipe is also its lifeline: when this process ends (even by kill -9) the child reads EOF
    and stops, so a restarted daemon never runs beside an orphaned worker for long. The child's
    stdout carries its heartbeat.
    """

    def __init__(self, config: Config, index: int, supervisor: WorkerSupervisor) -> None:
        self.config = config
        self.index = index
        self.supervisor = supervisor  # its `stopping` flag, set as soon as a stop begins
        self.proc: asyncio.subprocess.Process | None = None
        self._pipe = -1
        self._last_beat = -math.inf  # monotonic; the current child's last heartbeat
        self._tasks: list[asyncio.Task[None]] = []

    def beat_age(self) -> float:
        """Seconds since the running child's last heartbeat (inf while none is running or it has not beaten)."""
        alive = self.proc is not None and self.proc.returncode is None
        return time.monotonic() - self._last_beat if alive else math.inf

    async def spawn(self) -> None:
        read_end, self._pipe = os.pipe()
        self._last_beat = -math.inf  # the last child's beats do not vouch for this one
        os.set_blocking(self._pipe, False)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "careservice", "worker", "--config", str(self.config.path),
            "--index", str(self.index), "--of", str(self.config.workers), stdin=read_end,
            stdout=asyncio.subprocess.PIPE, env=worker_environment(),
        )
        os.close(read_end)
        self._tasks.append(asyncio.create_task(self._listen(self.proc)))

    async def _listen(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while await proc.stdout.read(64):
            self._last_beat = time.monotonic()

    def supervise(self) -> None:
        self._tasks.append(asyncio.create_task(self._supervise()))

    async def _supervise(self) -> None:
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            metrics.process_gone(self.proc.pid)
            await asyncio.sleep(0)  # a stop signal delivered with the worker's own exit is handled first
            if self.supervisor.stopping:
                return
            log.error("worker_exited index=%d code=%s restarting_in=%s", self.index, code, RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            if self.supervisor.stopping:
                return
            old = self._pipe
            await self.spawn()
            os.close(old)  # only now: a closed fd's number goes to the next socket, and wake() would write there

    def wake(self) -> None:
        if self._pipe < 0:
            return  # stopping: the number of the closed pipe may already be a client's socket
        try:
            os.write(self._pipe, b"w")
        except (BlockingIOError, BrokenPipeError, OSError):
            pass

    def reload(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGHUP)

    async def stop(self, timeout: float) -> None:
        """Close the child's pipe (it finishes its batch and delivery) and wait; kill it after `timeout`."""
        pipe, self._pipe = self._pipe, -1
        if pipe >= 0:
            os.close(pipe)
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                log.error("worker_stop_timeout index=%d seconds=%.0f killed=1", self.index, timeout)
                self.proc.kill()
                await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class WorkerSupervisor:
    """The `service.workers` children: each takes the cases of its own shard (SQLite) or claims its own
    (PostgreSQL); the daemon is healthy only while every one of them beats."""

    def __init__(self, config: Config) -> None:
        self.data_dir = config.data_dir
        self.stopping = False  # set as soon as a stop begins: a worker exiting then is not restarted
        self.children = [WorkerChild(config, index, self) for index in range(config.workers)]

    @property
    def healthy(self) -> bool:
        return self.beat_age() < HEALTHY_WITHIN

    def beat_age(self) -> float:
        """Seconds since the heartbeat of the worker that beat least recently (inf while one is down)."""
        return max(child.beat_age() for child in self.children)

    async def start(self) -> None:
        """Spawn the workers and wait (bounded) for each one's first heartbeat, so that READY means ready."""
        await asyncio.to_thread(workerlock.previous_gone, self.data_dir)
        for child in self.children:
            await child.spawn()
        deadline = time.monotonic() + START_WAIT
        while not self.healthy and time.monotonic() < deadline:
            if any(c.proc is not None and c.proc.returncode is not None for c in self.children):
                break  # the supervisor restarts it
            await asyncio.sleep(0.02)
        for child in self.children:
            child.supervise()

    def wake(self) -> None:
        """Tell every worker that new cases are committed (a lost byte only delays it to its next poll):
        each one's shard may hold some of them."""
        for child in self.children:
            child.wake()

    def reload(self) -> None:
        for child in self.children:
            child.reload()

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        await asyncio.gather(*(child.stop(timeout) for child in self.children))
