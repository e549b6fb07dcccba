"""Contact form throughput: valid POSTs (verification off) committed, forwarded and acknowledged per second.

`run(n, concurrency)` starts a relay sink and the daemon, sends `n` valid submissions from
`concurrency` keep-alive HTTP clients (threads, http.client) on loopback, and reports two rates: POSTs
answered 303 (committed) per second (`accepted_rate`, the issue's measure, judged by scenario 4), and
submissions whose forward and ack reached the relay per second (`rate`). Baselines of the same run,
same daemon: GET of the form page by the same clients (the HTTP stack and template rendering alone),
and `n` mails of the same size sent over SMTP (bench.load, `concurrency` sessions, one message per
connection): the mail path the form joins. Bounded by `n` and DRAIN_TIMEOUT.
"""

from __future__ import annotations

import http.client
import itertools
import json
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bench.load import CustomerMails, Job, LoadResult, send
from bench.procstat import Meter
from bench.report import percentile
from bench.servers import BenchDaemon, PySink
from tests.support import Daemon

PATH = "/ticketnest/contact"
WARMUP = 50
DRAIN_TIMEOUT = 600.0
REQUEST_TIMEOUT = 30.0


def form_body(index: int) -> bytes:
    """Submission `index`: its own customer address (acks are limited per address), all fields filled."""
    return urlencode({
        "name": f"Customer {index:08d}", "email": f"customer{index:08d}@customer.example",
        "company": "Ätna Events GmbH", "address": "Hauptstraße 1\n10115 Berlin", "telephone": "+49 30 123456",
        "fax": "", "preferred_contact": "email",
        "query": f"Hello, my tickets for order {index} did not arrive. Could you please have a look?\n" * 5,
    }).encode()


def _clients(port: int, count: int, concurrency: int, request: Callable[[int], tuple[str, bytes | None]],
             expect: int, first: int = 0) -> tuple[list[float], int, float, float]:
    """Send `count` requests over `concurrency` keep-alive connections: (latencies, failures, wall, CPU s)."""
    indexes = itertools.count(first)
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        mine: list[float] = []
        bad = 0
        try:
            while (i := next(indexes)) < first + count:
                method, body = request(i)
                started = time.perf_counter()
                try:
                    conn.request(method, PATH, body=body, headers=headers if body else {})
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == expect
                except (OSError, http.client.HTTPException):
                    conn.close()
                    ok = False
                mine.append(time.perf_counter() - started)
                bad += not ok
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)
                failures[0] += bad

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    cpu0, t0 = _own_cpu(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures[0], time.monotonic() - t0, _own_cpu() - cpu0


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _post(i: int) -> tuple[str, bytes | None]:
    return "POST", form_body(i)


def _get(i: int) -> tuple[str, bytes | None]:
    return "GET", None


def _smtp_baseline(daemon: BenchDaemon, n: int, concurrency: int, size: int) -> tuple[LoadResult, float]:
    """`n` customer mails of about `size` bytes over SMTP into the same daemon: the result and the seconds
    until all their forwards and acks were delivered (0.0 if not within DRAIN_TIMEOUT)."""
    before = {kind: daemon.log.delivered[kind] for kind in ("forward", "ack")}
    t0 = time.monotonic()
    result = send(Job(daemon.port, CustomerMails(size), n, concurrency, first=10_000_000 + n, seconds=DRAIN_TIMEOUT),
                  meter=Meter(daemon.pid, tree=True))
    drained = daemon.log.wait({kind: count + result.ok for kind, count in before.items()}, DRAIN_TIMEOUT)
    return result, time.monotonic() - t0 if drained else 0.0


def run(n: int, concurrency: int) -> dict[str, Any]:
    """Measure `n` valid form POSTs from `concurrency` clients against a fresh daemon (verification off)."""
    with tempfile.TemporaryDirectory(prefix="careservice-bench-form-") as tmp, PySink() as relay:
        daemon = BenchDaemon(Path(tmp), relay.port)
        text = daemon.config.read_text()
        daemon.config.write_text(text.replace('verification = "off"', 'verification = "off"\n'
                                              f"max_posts_per_ip_per_hour = {2 * (n + WARMUP)}\n"
                                              f"max_posts_per_minute = {2 * (n + WARMUP)}"))
        port = Daemon(daemon.config).web_port  # the [web] listen port of that config
        with daemon:
            get_lat, get_failed, get_wall, get_cpu = _clients(port, n, concurrency, _get, 200)
            _clients(port, WARMUP, concurrency, _post, 303)
            if not daemon.log.wait({"forward": WARMUP, "ack": WARMUP}, DRAIN_TIMEOUT):
                raise RuntimeError(f"warm-up not delivered: {dict(daemon.log.delivered)}")
            meter = Meter(daemon.pid, tree=True).start()
            t0 = time.monotonic()
            lat, failed, wall, cpu = _clients(port, n, concurrency, _post, 303, first=WARMUP)
            drained = daemon.log.wait({"forward": WARMUP + n - failed, "ack": WARMUP + n - failed}, DRAIN_TIMEOUT)
            done = time.monotonic() - t0
            usage = meter.stop()
            committed = daemon.log.committed - WARMUP
            smtp, smtp_done = _smtp_baseline(daemon, n, concurrency, len(form_body(0)))
    ok = n - failed
    return {
        "rate": ok / done if drained else None, "unit": "posts/s",
        "accepted_rate": ok / wall, "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
        "server_cores": usage.server_cores, "machine_cores": usage.machine_cores, "gen_cores": cpu / wall,
        "steal_cores": usage.steal_cores,
        "baseline_rate": (n - get_failed) / get_wall, "baseline": "GET of the form page, same clients",
        "baseline_p50_ms": percentile(get_lat, 50) * 1000, "baseline_gen_cores": get_cpu / get_wall,
        "smtp_accepted_rate": smtp.rate, "smtp_rate": smtp.ok / smtp_done if smtp_done else None,
        "smtp_p50_ms": smtp.p50_ms, "smtp_server_cores": smtp.usage.server_cores if smtp.usage else None,
        "posts": n, "concurrency": concurrency, "failed": failed, "committed": committed,
        "note": "" if drained and not failed else f"{failed} failed, drained={drained}",
    }


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    print(json.dumps(run(count, clients), indent=2))
