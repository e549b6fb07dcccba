"""IMAP drain rate and APPEND-to-forward latency: careservice next to a plain imapclient loop.

One private Dovecot (tests/dovecot.py) serves every run. A drain run writes `n` messages into the
Maildir's tmp/, starts the clock, renames them into new/ (as a delivering MTA does), and stops the
clock when new/ and cur/ are empty again:

* baseline: a logged-in imapclient session does UID SEARCH, then per 100 UIDs UID FETCH BODY.PEEK[],
  UID STORE +FLAGS.SILENT (\\Deleted), UID EXPUNGE;
* careservice: `careservice run` (log level INFO, relay = a capture SMTP server on loopback), IDLEing
  on the folder; a message leaves the folder only after its case is committed.

Baseline and careservice alternate `reps` times (fresh daemon and data dir each time); medians are
reported. Latency: with the daemon IDLEing, one message is APPENDed at a time over an open session
and timed until its forward reaches the capture relay.

    python -m bench.imap [--n 5000] [--size 3000] [--reps 3] [--samples 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imapclient
from imapclient import DELETED

from tests.dovecot import DovecotServer, dovecot_binary, start_dovecot
from tests.support import STAFF, CaptureRelay, Daemon, customer_mail, imap_config, wait_for

BATCH = 100
DRAIN_TIMEOUT = 600.0


def messages(n: int, size: int, tag: str) -> list[bytes]:
    """`n` customer mails of about `size` bytes, each with its own sender, subject and Message-ID."""
    head = customer_mail(f"{tag} {n}", "", sender=f"customer{n}@customer.example")  # the longest index's
    lines = max(1, (size - len(head)) // 77)
    return [customer_mail(f"{tag} {i}", "\n".join(f"{i:08d} " + "x" * 66 for _ in range(lines)),
                          sender=f"customer{i}@customer.example") for i in range(n)]


def _maildir_ready(dovecot: DovecotServer) -> None:
    dovecot.count()  # the first SELECT creates the Maildir
    owner = dovecot.maildir.parent.stat()
    for sub in ("tmp", "new", "cur"):
        (dovecot.maildir / sub).mkdir(exist_ok=True)
        os.chown(dovecot.maildir / sub, owner.st_uid, owner.st_gid)


def stage(dovecot: DovecotServer, raws: list[bytes], tag: str) -> list[tuple[Path, Path]]:
    """Write `raws` into the Maildir's tmp/ (owned by the mail user); returns (tmp, new) path pairs."""
    _maildir_ready(dovecot)
    owner = dovecot.maildir.parent.stat()
    moves = []
    for i, raw in enumerate(raws):
        name = f"{int(time.time())}.M{i}P{os.getpid()}{tag}.bench,S={len(raw)}"
        tmp = dovecot.maildir / "tmp" / name
        tmp.write_bytes(raw)
        os.chown(tmp, owner.st_uid, owner.st_gid)
        moves.append((tmp, dovecot.maildir / "new" / name))
    return moves


def maildir_count(dovecot: DovecotServer) -> int:
    return sum(len(os.listdir(dovecot.maildir / sub)) for sub in ("new", "cur"))


@dataclass(frozen=True)
class Drain:
    rate: float  # msg/s from the first look at the folder until it is empty
    end_to_end: float  # msg/s from delivery into new/ until the folder is empty
    notice_ms: float  # delivery until the first look (Dovecot delays IDLE notices by 500 ms)


def timed_drain(dovecot: DovecotServer, moves: list[tuple[Path, Path]], drain: Callable[[], None] | None) -> Drain:
    """Deliver `moves` into new/ and time until the folder is empty; `drain` does the work, or else
    a daemon IDLEing on the folder does (then `seen` waits for the server's IDLE notice)."""
    delivered = time.perf_counter()
    for tmp, new in moves:
        os.rename(tmp, new)
    if drain is not None:
        drain()
        seen = delivered
    else:  # Dovecot moves new/ to cur/ when a session looks: the IDLE notice reached the daemon
        wait_for(lambda: len(os.listdir(dovecot.maildir / "new")) < len(moves), timeout=DRAIN_TIMEOUT,
                 what="daemon noticed the mail")
        seen = time.perf_counter()
    wait_for(lambda: maildir_count(dovecot) == 0, timeout=DRAIN_TIMEOUT, what="folder drained")
    empty = time.perf_counter()
    return Drain(len(moves) / (empty - seen), len(moves) / (empty - delivered), (seen - delivered) * 1000)


def baseline_run(dovecot: DovecotServer, n: int, size: int, tag: str) -> Drain:
    """The plain fetch-and-delete loop over an already logged-in session."""
    moves = stage(dovecot, messages(n, size, tag), tag)
    with dovecot.client() as client:
        client.select_folder("INBOX")

        def drain() -> None:
            client.noop()
            uids = client.search("ALL")
            for i in range(0, len(uids), BATCH):
                batch = uids[i:i + BATCH]
                fetched = client.fetch(batch, ["BODY.PEEK[]"])
                assert all(b"BODY[]" in fetched[u] for u in batch)
                client.add_flags(batch, [DELETED], silent=True)
                client.uid_expunge(batch)

        return timed_drain(dovecot, moves, drain)


def start_daemon(root: Path, relay: CaptureRelay, dovecot: DovecotServer) -> Daemon:
    """careservice with one [[imap]] table for `dovecot`, logging at INFO, IDLEing once this returns."""
    config = imap_config(root, relay, dovecot)
    config.write_text(config.read_text().replace('log_level = "DEBUG"', 'log_level = "INFO"'))
    daemon = Daemon(config).start()
    wait_for(lambda: "imap_working" in daemon.log.read_text(), what="imap worker idling")
    return daemon


def careservice_run(root: Path, relay: CaptureRelay, dovecot: DovecotServer, n: int, size: int,
                    tag: str) -> Drain:
    """Through careservice: committed as cases, then deleted from the server."""
    daemon = start_daemon(root, relay, dovecot)
    try:
        moves = stage(dovecot, messages(n, size, tag), tag)
        result = timed_drain(dovecot, moves, None)
        log = daemon.log.read_text()
    finally:
        daemon.stop()
    taken = sum(int(part.split("=")[1]) for line in log.splitlines() if "imap_taken" in line
                for part in line.split() if part.startswith("messages="))
    duplicates = log.count("duplicates=") - log.count("duplicates=0")
    if taken != n or duplicates:
        raise RuntimeError(f"careservice took {taken} of {n} messages ({duplicates} batches with duplicates)")
    return result


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_run(root: Path, relay: CaptureRelay, dovecot: DovecotServer, samples: int, size: int) -> list[float]:
    """Milliseconds from APPEND to the forward's arrival at the relay, one message at a time."""
    daemon = start_daemon(root, relay, dovecot)
    out = []
    try:
        with dovecot.client() as client:
            for i, raw in enumerate(messages(samples, size, "latency")):
                before = len(relay.to(STAFF))
                started = time.perf_counter()
                client.append("INBOX", raw)
                wait_for(lambda b=before: len(relay.to(STAFF)) > b, what=f"forward of latency {i}")  # type: ignore[misc]
                out.append((time.perf_counter() - started) * 1000)
                time.sleep(0.05)  # let the acknowledgement go out before the next sample
    finally:
        daemon.stop()
    return out


def idle_notice_run(dovecot: DovecotServer, samples: int, size: int) -> list[float]:
    """Milliseconds from APPEND to the EXISTS a plain imapclient IDLE session gets: the server's floor."""
    out = []
    with dovecot.client() as watcher, dovecot.client() as appender:
        watcher.select_folder("INBOX")
        for raw in messages(samples, size, "notice"):
            watcher.idle()
            started = time.perf_counter()
            appender.append("INBOX", raw)
            deadline = started + 30
            while not any(len(r) > 1 and r[1] == b"EXISTS" for r in watcher.idle_check(1)):
                if time.perf_counter() > deadline:
                    raise RuntimeError("no EXISTS within 30 s")
            out.append((time.perf_counter() - started) * 1000)
            watcher.idle_done()
        watcher.delete_messages(watcher.search("ALL"))
        watcher.expunge()
    return out


def dovecot_version() -> str:
    binary = dovecot_binary()
    if binary is None:
        return ""
    return subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def run(n: int, size: int, reps: int = 3, samples: int = 50) -> dict[str, Any]:
    """Drain `n` messages of `size` bytes `reps` times each way, then `samples` APPEND latencies."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    relay = CaptureRelay().start()
    dovecot = start_dovecot(tmp)
    baseline: list[Drain] = []
    careservice: list[Drain] = []
    try:
        for rep in range(reps):
            baseline.append(baseline_run(dovecot, n, size, f"b{rep}"))
            careservice.append(careservice_run(tmp / f"svc{rep}", relay, dovecot, n, size, f"c{rep}"))
        notices = idle_notice_run(dovecot, samples, size)
        latencies = latency_run(tmp / "latency", relay, dovecot, samples, size)
    finally:
        dovecot.stop()
        relay.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def median(runs: list[Drain], field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    base, ours = median(baseline, "rate"), median(careservice, "rate")
    return {
        "n": n, "size": size, "reps": reps,
        "baseline_msg_s": round(base), "baseline_runs": [round(r.rate) for r in baseline],
        "careservice_msg_s": round(ours), "careservice_runs": [round(r.rate) for r in careservice],
        "ratio": round(ours / base, 3), "goal_ratio": 0.5,
        "careservice_end_to_end_msg_s": round(median(careservice, "end_to_end")),
        "careservice_idle_notice_ms": round(median(careservice, "notice_ms")),
        "latency_samples": len(latencies),
        "append_to_forward_p50_ms": round(percentile(latencies, 50), 1),
        "append_to_forward_p99_ms": round(percentile(latencies, 99), 1),
        "plain_idle_exists_p50_ms": round(percentile(notices, 50), 1),
        "plain_idle_exists_p99_ms": round(percentile(notices, 99), 1),
        "dovecot": dovecot_version(), "imapclient": imapclient.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--size", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = run(args.n, args.size, args.reps, args.samples)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
