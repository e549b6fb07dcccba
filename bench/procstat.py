"""CPU and memory of processes and of the machine, read from /proc (Linux)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # the command name may hold spaces and ")"


def family(pid: int) -> list[int]:
    """`pid` and all its live descendants (one pass over /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                kids.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    pids, found = [pid], []
    while pids:
        current = pids.pop()
        found.append(current)
        pids.extend(kids.get(current, []))
    return found


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """User+system seconds of `pid` (all threads) and of its reaped children; with `tree`, of all
    live descendants too (a master process such as Postfix's reaps the workers that exit)."""
    total = 0.0
    for current in family(pid) if tree else [pid]:
        try:
            total += sum(int(v) for v in _stat_fields(current)[11:15]) / TICK  # utime stime cutime cstime
        except OSError:
            continue
    return total


def rss_bytes(pid: int, tree: bool = False) -> int:
    """Resident set size of `pid` (with `tree`: summed over it and its descendants)."""
    total = 0
    for current in family(pid) if tree else [pid]:
        try:
            lines = Path(f"/proc/{current}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)
    return total


def machine_seconds() -> tuple[float, float]:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait), and of those the
    steal: time a virtual machine's CPUs were ready but the hypervisor ran something else."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICK, values[7] / TICK


@dataclass(frozen=True)
class Usage:
    wall: float
    server_cores: float  # CPU seconds of the measured server per second of wall time
    machine_cores: float  # busy cores of the whole machine (of os.cpu_count()), steal included
    # cores the hypervisor gave to other guests while ours were ready to run: a row measured under much of
    # it measured the host, and the latency tail follows it
    steal_cores: float = 0.0


class Meter:
    """CPU used by a server (one pid, optionally its process tree) and the machine between start and stop."""

    def __init__(self, pid: int | None, tree: bool = False) -> None:
        self.pid = pid
        self.tree = tree
        self._t0 = self._server0 = self._machine0 = self._steal0 = 0.0

    def _server(self) -> float:
        return cpu_seconds(self.pid, self.tree) if self.pid else 0.0

    def start(self) -> Meter:
        self._t0, self._server0 = time.monotonic(), self._server()
        self._machine0, self._steal0 = machine_seconds()
        return self

    def stop(self) -> Usage:
        wall = max(time.monotonic() - self._t0, 1e-9)
        machine, steal = machine_seconds()
        return Usage(wall, (self._server() - self._server0) / wall, (machine - self._machine0) / wall,
                     (steal - self._steal0) / wall)
