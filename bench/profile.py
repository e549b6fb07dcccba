"""`python -m bench.profile`: where the daemon's CPU per case goes, sampled with py-spy, as a chart.

A fresh daemon takes N cases (3 KB, 10 senders, one connection per message) and delivers their
forwards and acks to smtp-sink while py-spy samples both processes (`--subprocesses`, idle threads
left out). Each sample goes to the component of the frame nearest its leaf that names one (below);
the shares are scaled to the daemon's measured CPU per case (/proc), so the bars add up to it.
Writes bench/results/profile-*.json (components and the top functions), profile-*.svg (pygal) and
profile-*.folded (the stacks, for a flame graph).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.load import CustomerMails, Job, send
from bench.postfix import relay_sink
from bench.servers import DRAIN_TIMEOUT, BenchDaemon

COMPONENTS = ("intake SMTP", "intake commit", "parse", "render", "relay client", "store", "stages and loop",
              "logging", "metrics")
# (process, frame file pattern, component), tried from the leaf frame towards the root: the first
# frame that matches one decides. A sample matching none: "intake SMTP" in the daemon (its loop,
# aiosmtpd, the handler), "stages and loop" in the worker (runner, stages, asyncio).
RULES = (
    ("any", re.compile(r"\(logging/"), "logging"),
    ("any", re.compile(r"\(prometheus_client/"), "metrics"),
    ("run", re.compile(r"\(careservice/store/"), "intake commit"),
    ("worker", re.compile(r"\(careservice/store/|^WalCheckpointer\."), "store"),
    ("worker", re.compile(r"\(careservice/mimeparse\.py|^parse \(careservice/mail\.py"), "parse"),
    ("worker", re.compile(r"\((careservice/(mail|texts)\.py|jinja2/)"), "render"),
    ("worker", re.compile(r"\((aiosmtplib/|careservice/(outbox|smtpclient|dkim)\.py)"), "relay client"),
)
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>.+?):\d+\)$")
_EXECUTOR = (Path(__file__).resolve().parent.parent / "careservice" / "store" / "executor.py").read_text().splitlines()
_COMMIT = next(n for n, line in enumerate(_EXECUTOR, 1) if '"COMMIT"' in line)
_FDATASYNC = next(n for n, line in enumerate(_EXECUTOR, 1) if "os.fdatasync(" in line)
# leaves where a thread waits rather than computes: py-spy counts some of them as active (a thread
# in the disk's uninterruptible wait, as in an fsync, is not idle to it), so they are left out of the
# CPU shares and reported apart (the COMMIT's share is mostly its fsyncs; the intake syncs its WALs itself)
WAITING = re.compile(r"^(EpollSelector\.select \(selectors\.py|_worker \(concurrent/futures/thread\.py|Condition\.wait "
                     r"|ThreadedChildWatcher\._do_waitpid "
                     rf"|\w*Executor\._locked_transaction \(careservice/store/executor\.py:{_COMMIT}\)"
                     rf"|\w*Executor\._sync_wals \(careservice/store/executor\.py:{_FDATASYNC}\))")


def classify(stack: str) -> tuple[str, str, str]:
    """(component, process, leaf function) of one raw py-spy stack."""
    frames = stack.split(";")
    process = "worker" if any("careservice worker" in f for f in frames[:2] if f.startswith("process ")) else "run"
    thread = next((f for f in frames if f.startswith("thread (")), "")
    code = [f for f in frames if _FRAME.match(f)]
    leaf = code[-1] if code else frames[-1]
    if WAITING.match(leaf):
        return "waiting", process, leaf
    for frame in reversed(code):
        for where, pattern, component in RULES:
            if where in ("any", process) and pattern.search(frame):
                return component, process, leaf
    if process == "run" and thread.endswith("careservice-store"):
        return "intake commit", process, leaf
    return ("intake SMTP" if process == "run" else "stages and loop"), process, leaf


def read_raw(path: Path) -> Counter[str]:
    """py-spy's raw (collapsed) output: one "frame;frame;... count" per line."""
    stacks: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def profile(cases: int, rate: int, out: Path, offered: float = 0.0) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with relay_sink() as relay, tempfile.TemporaryDirectory(prefix="careservice-profile-") as tmp, \
            BenchDaemon(Path(tmp), relay.port) as daemon:
        warm = send(Job(daemon.port, CustomerMails(3_000), 100, 10))
        daemon.drain(warm.ok, "warm-up")
        raw = Path(tmp) / "spy.txt"
        sampler = subprocess.Popen([spy, "record", "--pid", str(daemon.pid), "--subprocesses", "--format", "raw",
                                    "--output", str(raw), "--rate", str(rate), "--threads"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches to both processes
        cpu0 = daemon.cpu()
        seconds = cases / offered + 5 if offered else DRAIN_TIMEOUT
        result = send(Job(daemon.port, CustomerMails(3_000), cases, 10, 1, seconds, rate=offered, first=warm.ok))
        daemon.drain(warm.ok + result.ok, "profiled run")
        cpu_ms = 1000 * (daemon.cpu() - cpu0) / result.ok
        sampler.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        sampler.wait(60)
        stacks = read_raw(raw)
        stem = out / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw, stem.with_suffix(".folded"))  # for a flame graph (flamegraph.pl, speedscope)
    by_component: Counter[str] = Counter()
    by_process: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, count in stacks.items():
        component, process, leaf = classify(stack)
        by_component[component] += count
        if component != "waiting":
            by_process[process] += count
            leaves[f"{process}: {leaf}"] += count
    total = sum(n for c, n in by_component.items() if c != "waiting") or 1
    report = {
        "cases": result.ok, "offered_rate": offered or None, "intake_rate": result.rate, "cpu_ms_per_case": cpu_ms,
        "samples": total, "waiting_samples": by_component["waiting"],
        "ms_per_case": {c: cpu_ms * by_component[c] / total for c in COMPONENTS},
        "process_share": {p: n / total for p, n in by_process.items()},
        "top_leaf_functions": [(name, n / total) for name, n in leaves.most_common(25)],
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    chart(report, stem.with_suffix(".svg"))
    return report


def chart(report: dict[str, Any], path: Path) -> None:
    """A horizontal bar per component, in ms of CPU per case."""
    import pygal

    pace = f", {report['offered_rate']:g}/s offered" if report.get("offered_rate") else ""
    bars = pygal.HorizontalBar(title=f"careservice CPU per case by component: {report['cpu_ms_per_case']:.2f} ms "
                                     f"({report['cases']} cases, 3 KB, c=10{pace}, py-spy)",
                               x_title="ms of CPU per case", print_values=True, value_formatter=lambda v: f"{v:.2f}",
                               width=900, height=500, legend_at_bottom=True)
    for component in COMPONENTS:
        bars.add(component, [report["ms_per_case"][component]])
    path.write_bytes(bars.render())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3_000)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (each pauses the processes)")
    parser.add_argument("--offered", type=float, default=0.0,
                        help="mails per second offered (0: as fast as the daemon takes them)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if not (shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()):
        parser.error("py-spy is not installed (pip install -e '.[bench]')")
    report = profile(args.cases, args.rate, args.out, args.offered)
    print(f"{report['cases']} cases, {report['cpu_ms_per_case']:.2f} ms CPU per case, {report['samples']} samples")
    for component, ms in report["ms_per_case"].items():
        print(f"  {component:16} {ms:6.3f} ms")
    print("top leaf functions (share of samples):")
    for name, share in report["top_leaf_functions"]:
        print(f"  {100 * share:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
