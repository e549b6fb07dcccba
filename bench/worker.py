"""`python -m bench.worker`: the case worker alone, draining a backlog, for A/B runs of worker changes.

Each round fills a fresh store as the intake does (N cases of scenario 2's 3 KB mail to one site),
then runs one CaseWorker in this process, on uvloop and with the daemon's INFO logging, until every
case is open and its forward and acknowledgement are delivered to smtp-sink. It reports cases/s and
this process's CPU per case over the drain (the worker's thread and its WAL checkpointer; the store's
counts, read from indexes, are polled every POLL seconds). That is the one-thread bound of scenario
2's full cycle, without the intake and the load generator competing for the cores. For an A/B, run it
once per checkout (PYTHONPATH) in interleaved rounds and compare medians: the machine is too noisy
for one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

import careservice
import careservice.handlers
import careservice.templates
from bench.load import CustomerMails
from bench.postfix import relay_sink
from bench.servers import write_config
from careservice.bootstrap import build_context
from careservice.config import Config, load_config
from careservice.logs import setup_logging
from careservice.model import Envelope, NewMessage, Source
from careservice.spamverdict import SKIPPED, stamp
from careservice.worker import CaseWorker

POLL = 0.3
FILL_BATCH = 50  # messages per intake commit, about what the intake's group commit takes under load
DRAIN_SECONDS = 600.0


async def fill(config: Config, cases: int) -> None:
    """Commit `cases` inbound mails as the SMTP intake does (its store, its stamp)."""
    mails = CustomerMails(3_000)
    _, store = build_context(config, intake=True)
    await store.start(sweep=True)
    try:
        for first in range(0, cases, FILL_BATCH):
            batch = [mails(i) for i in range(first, min(cases, first + FILL_BATCH))]
            await store.add_inbound([NewMessage(config.sites[0].id, Source.SMTP, Envelope(m.mail_from, m.rcpt),
                                                stamp(m.data, SKIPPED)) for m in batch], time.time())
    finally:
        await store.close()


async def drain(config: Config) -> tuple[float, float]:
    """(seconds, CPU seconds) until the worker has advanced every case and delivered all it queued."""
    worker = CaseWorker(config)
    await worker.start()
    started, cpu = time.perf_counter(), time.process_time()
    try:
        deadline = started + DRAIN_SECONDS
        while time.perf_counter() < deadline:
            await asyncio.sleep(POLL)
            counts = await worker.store.counts()
            if counts["inbound_pending"] == 0 and counts["outbound_queued"] == 0:
                return time.perf_counter() - started, time.process_time() - cpu
        raise RuntimeError(f"the worker did not drain in {DRAIN_SECONDS:.0f} s: {counts}")
    finally:
        await worker.stop(10)


def one_round(cases: int, relay_port: int) -> tuple[float, float]:
    """(cases/s, CPU ms per case) of one drain of `cases` in a fresh store."""
    with tempfile.TemporaryDirectory(prefix="careservice-bench-worker-") as tmp:
        root = Path(tmp)
        config = load_config(write_config(root, relay_port)[0])
        asyncio.run(fill(config, cases))  # its intake store creates the master key, as the daemon's does
        with (root / "worker.log").open("w") as log:
            setup_logging("INFO", log)
            seconds, cpu = uvloop.run(drain(config))
    return cases / seconds, 1000 * cpu / cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    # which checkout runs: `python -m` puts the working directory ahead of PYTHONPATH (README, bench.worker)
    print(f"code: careservice {Path(careservice.__file__).parent}, "
          f"stages {Path(careservice.handlers.__file__).parent}, "
          f"templates {Path(careservice.templates.__file__).parent}", flush=True)
    results = []
    with relay_sink() as relay:
        for n in range(args.rounds):
            rate, cpu_ms = one_round(args.cases, relay.port)
            results.append((rate, cpu_ms))
            print(f"round {n + 1}: {args.cases} cases, {rate:.0f} cases/s, {cpu_ms:.3f} ms CPU per case", flush=True)
    print(f"median: {statistics.median(r for r, _ in results):.0f} cases/s, "
          f"{statistics.median(c for _, c in results):.3f} ms CPU per case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
