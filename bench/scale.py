"""`python -m bench.scale`: scenario 6's per-case cost at several open-case levels, per process, for A/B runs.

Like scenario 6 (bench.scenarios.scale), one daemon per variant and round is filled with open cases
(3 KB, 10 senders, 10 messages per connection) and, at each level, takes a measured batch (one message
per connection) that is drained to the relay. Per batch it reports the CPU per case of the intake
process and of the worker apart, their RSS, and the largest WAL of cases.db and keys.db seen
(sampled every 0.2 s) with the free pages of cases.db (read from its header, so no reader holds the
WAL). Variants are trees and environments as in bench.ab; their order alternates between rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.ab import Variant, _variant
from bench.load import CustomerMails, Job, send
from bench.postfix import relay_sink
from bench.procstat import TICK, cpu_seconds, family, rss_bytes
from bench.servers import DRAIN_TIMEOUT, BenchDaemon
from careservice.store import read_status

SIZE = 3_000
WALS = ("cases.db-wal", "keys.db-wal")


class WalWatch:
    """The largest size each WAL reached while it ran (a thread stat()ing them every 0.2 s)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.largest = dict.fromkeys(WALS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name in WALS:
                try:
                    self.largest[name] = max(self.largest[name], (self.data_dir / name).stat().st_size)
                except FileNotFoundError:
                    continue

    def __enter__(self) -> WalWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _free_pages(db: Path) -> tuple[int, int]:
    """(pages, free pages) of a database file as its header says (the WAL may hold newer counts)."""
    with db.open("rb") as f:
        header = f.read(40)
    return int.from_bytes(header[28:32]), int.from_bytes(header[36:40])


def _split(daemon: BenchDaemon) -> tuple[float, float]:
    """CPU seconds of the intake process and of its workers."""
    intake = cpu_seconds(daemon.pid)
    return intake, cpu_seconds(daemon.pid, tree=True) - intake


def _ticks(daemon: BenchDaemon) -> dict[str, float]:
    """CPU seconds, user and system apart, of the intake process and of each thread of the worker."""
    out = {}
    for pid in family(daemon.pid)[:2]:
        for task in Path(f"/proc/{pid}/task").iterdir() if pid != daemon.pid else [Path(f"/proc/{pid}")]:
            fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            name = "intake" if pid == daemon.pid else f"worker.{task.name}"
            out[f"{name} user"], out[f"{name} sys"] = int(fields[11]) / TICK, int(fields[12]) / TICK
    return out


def _ticks_per_case(before: dict[str, float], after: dict[str, float], cases: int) -> str:
    """The intake's user/sys and the worker's busiest threads' user/sys, in ms per case."""
    per = {k: 1000 * (after[k] - before.get(k, 0.0)) / cases for k in after}
    threads = sorted({k.rsplit(" ", 1)[0] for k in per}, key=lambda t: -(per[f"{t} user"] + per[f"{t} sys"]))
    return " ".join(f"{t} {per[f'{t} user']:.2f}+{per[f'{t} sys']:.2f}" for t in threads[:4])


def _io(daemon: BenchDaemon) -> list[dict[str, int]]:
    """/proc/PID/io of the intake process and of the worker (bytes and calls of read and write)."""
    out = []
    for pid in family(daemon.pid)[:2]:
        lines = Path(f"/proc/{pid}/io").read_text().split("\n")
        out.append({k: int(v) for k, v in (line.split(": ") for line in lines if line)})
    return out


def _io_per_case(before: list[dict[str, int]], after: list[dict[str, int]], cases: int) -> str:
    def per(a: dict[str, int], b: dict[str, int], key: str, unit: int = 1) -> str:
        return f"{(a[key] - b[key]) / cases / unit:.0f}"

    return " | ".join(f"{per(a, b, 'rchar', 1024)}/{per(a, b, 'wchar', 1024)} KB "
                      f"{per(a, b, 'syscr')}/{per(a, b, 'syscw')} calls" for b, a in zip(before, after, strict=True))


def run_variant(v: Variant, levels: list[int], batch: int, log: Any) -> list[dict[str, Any]]:
    out = []
    with ExitStack() as stack:
        relay = stack.enter_context(relay_sink())
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="careservice-scale-")))
        daemon = stack.enter_context(BenchDaemon(root, relay.port, v.env, v.tree, v.settings))
        sent = 0
        for level in levels:
            fill = level - sent - batch
            if fill > 0:
                before = _split(daemon)
                with WalWatch(daemon.data_dir) as wal:
                    filled = send(Job(daemon.port, CustomerMails(SIZE), fill, 10, 10, DRAIN_TIMEOUT, first=sent))
                    sent += filled.ok
                    daemon.drain(sent, f"fill to {level}")
                after = _split(daemon)
                log(f"{v.name} fill to {sent:,}: {1000 * (sum(after) - sum(before)) / filled.ok:.2f} ms/case (intake "
                    f"{1000 * (after[0] - before[0]) / filled.ok:.2f}) WAL max "
                    f"{' '.join(f'{n / 2**20:.0f}' for n in wal.largest.values())} MB")
                out.append({"variant": v.name, "level": level, "fill": filled.ok,
                            "ms": 1000 * (sum(after) - sum(before)) / filled.ok,
                            "intake_ms": 1000 * (after[0] - before[0]) / filled.ok,
                            "wal_mb": {k: n / 2**20 for k, n in wal.largest.items()}})
            intake0, worker0 = _split(daemon)
            io0, ticks0 = _io(daemon), _ticks(daemon)
            with WalWatch(daemon.data_dir) as wal:
                r = send(Job(daemon.port, CustomerMails(SIZE), batch, 10, 1, DRAIN_TIMEOUT, first=sent))
                sent += r.ok
                daemon.drain(sent, f"batch at {level}")
            intake1, worker1 = _split(daemon)
            io = _io_per_case(io0, _io(daemon), r.ok)
            ticks = _ticks_per_case(ticks0, _ticks(daemon), r.ok)
            pages, free = _free_pages(daemon.data_dir / "cases.db")
            row = {"variant": v.name, "level": level, "open": read_status(daemon.data_dir)["open_cases"],
                   "intake_ms": 1000 * (intake1 - intake0) / r.ok, "worker_ms": 1000 * (worker1 - worker0) / r.ok,
                   "rate": r.rate, "rss_mb": {p: rss_bytes(p) / 2**20 for p in family(daemon.pid)},
                   "wal_mb": {k: n / 2**20 for k, n in wal.largest.items()}, "cases_pages": pages,
                   "cases_free": free, "failed": r.failed}
            row["ms"] = row["intake_ms"] + row["worker_ms"]
            row["rss_total_mb"] = sum(row["rss_mb"].values())
            out.append(row)
            log(f"{v.name} {row['open']:>7,} open: {row['ms']:.2f} ms/case (intake {row['intake_ms']:.2f} worker "
                f"{row['worker_ms']:.2f}) {r.rate:.0f} msg/s RSS {row['rss_total_mb']:.0f} MB "
                f"({' '.join(f'{m:.0f}' for m in row['rss_mb'].values())}) WAL max "
                f"{' '.join(f'{m:.1f}' for m in row['wal_mb'].values())} MB; cases.db {pages} pages {free} free; "
                f"read/written per case (intake | worker): {io}; user+sys ms per case: {ticks}")
            row["io"], row["ticks"] = io, ticks
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=_variant, action="append", required=True,
                        help="NAME=PATH[,KEY=VALUE...] as in bench.ab (one or more)")
    parser.add_argument("--levels", default="1000,10000,100000", help="open cases at each measured batch")
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON file for all batches")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    variants: list[Variant] = args.variant
    for rnd in range(args.rounds):
        for v in variants if rnd % 2 == 0 else variants[::-1]:
            rows += [{"round": rnd, **row} for row in run_variant(v, levels, args.batch, log)]
    for v in variants:
        for level in levels:
            mine = [r["ms"] for r in rows if r["variant"] == v.name and r["level"] == level and "fill" not in r]
            first = [r["ms"] for r in rows if r["variant"] == v.name and r["level"] == levels[0] and "fill" not in r]
            print(f"{v.name:10} {level:>7,}: {statistics.median(mine):.2f} ms/case "
                  f"({statistics.median(mine) / statistics.median(first):.2f}x {levels[0]:,}) "
                  f"[{' '.join(f'{m:.2f}' for m in mine)}]")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
