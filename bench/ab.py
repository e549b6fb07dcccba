"""`python -m bench.ab`: paired, interleaved A/B runs of careservice variants on a shared machine.

A variant is a source tree (a git worktree of the commit to test) and optional environment. Each
round runs the in-run baselines (bare aiosmtpd, and bare aiosmtpd on uvloop) and then
every variant, the variants' order alternating between rounds (A B, B A, ...), so that drift of the
machine spreads over all of them. Per variant and round, with a fresh daemon each:

- intake: 3 KB, 10 senders, one connection per message; msg/s at the 250, and the full cycle
  (cases/s from the first MAIL FROM until the last forward and ack reached the relay), the daemon's
  CPU per case and the generator's CPU;
- latency (with --latency N): N mails offered at --rate msg/s, 250 -> forward at the relay, the
  daemon's CPU per case at that rate and the host's CPU steal meanwhile (bench.procstat.Usage).

Ratios are to the bare aiosmtpd of the same round; the summary gives each variant's median ratio. With
--floor, each round also runs scenario 2's cycle floor (bench.cyclefloor) on both loops, and each variant's
full cycle gets its ratio to the standard-loop floor of its round: paired, so that a host that slows
between runs moves both (a full run measures each once, minutes apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cyclefloor import run_floor
from bench.load import CustomerMails, Job, send
from bench.postfix import relay_sink
from bench.procstat import Meter
from bench.report import percentile
from bench.scenarios import paced
from bench.servers import DRAIN_TIMEOUT, BenchDaemon, PySink, bare_run

SIZE = 3_000
WARMUP = 100


@dataclass(frozen=True)
class Variant:
    name: str
    tree: Path
    env: dict[str, str]  # environment of the daemon
    settings: dict[str, str]  # config "table.key" -> TOML value


def _variant(text: str) -> Variant:
    """NAME=PATH[,KEY=VALUE...]; a KEY with a dot is a config setting (service.event_loop="asyncio")."""
    name, _, rest = text.partition("=")
    path, *pairs = rest.split(",")
    items = [pair.split("=", 1) for pair in pairs]
    if not name or not (Path(path) / "careservice").is_dir() or any(len(item) != 2 for item in items):
        raise argparse.ArgumentTypeError(f"{text}: expected NAME=PATH of a careservice tree[,KEY=VALUE...]")
    return Variant(name, Path(path).resolve(), {k: v for k, v in items if "." not in k},
                   {k: v for k, v in items if "." in k})


def _bare(count: int, uvloop: bool, first: int) -> dict[str, Any]:
    r = bare_run(count, first, WARMUP, 60, uvloop)
    return {"rate": r.rate, "gen_cores": r.gen_cores, "server_cores": r.usage.server_cores if r.usage else None,
            "failed": r.failed}


def _floor(count: int, uvloop: bool) -> dict[str, Any]:
    c = run_floor(uvloop, count, WARMUP)
    return {"rate": c.result.rate, "cycle": c.rate, "cpu_ms_per_case": c.cpu_ms, "gen_cores": c.gen_cores,
            "server_cores": c.usage.server_cores, "failed": c.result.failed}


def _intake(v: Variant, count: int, first: int) -> dict[str, Any]:
    with ExitStack() as stack:
        relay = stack.enter_context(relay_sink())
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="careservice-ab-")))
        daemon = stack.enter_context(BenchDaemon(root, relay.port, v.env, v.tree, v.settings))
        warm = send(Job(daemon.port, CustomerMails(SIZE), WARMUP, 10, first=first))
        daemon.drain(warm.ok, "warm-up")
        cpu0 = daemon.cpu()
        r = send(Job(daemon.port, CustomerMails(SIZE), count, 10, 1, DRAIN_TIMEOUT, first=first + WARMUP),
                 meter=Meter(daemon.pid, tree=True))
        daemon.drain(warm.ok + r.ok, "intake run")
        seconds = max(daemon.log.last["forward"], daemon.log.last["ack"]) - min(rec[1] for rec in r.records)
        return {"rate": r.rate, "cycle": r.ok / seconds, "cpu_ms_per_case": 1000 * (daemon.cpu() - cpu0) / r.ok,
                "gen_cores": r.gen_cores, "server_cores": r.usage.server_cores if r.usage else None,
                "p99_ms": r.p99_ms, "failed": r.failed}


def _latency(v: Variant, count: int, rate: float, first: int) -> dict[str, Any]:
    with ExitStack() as stack:
        relay = stack.enter_context(PySink(record=True))
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="careservice-ab-")))
        daemon = stack.enter_context(BenchDaemon(root, relay.port, v.env, v.tree, v.settings))
        run = paced(daemon, relay, WARMUP, count, rate, first, meter=Meter(None))  # the machine's steal only
        ms, r = run.latencies, run.result
        return {"timed": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
                "max_ms": max(ms, default=0.0), "gen_cores": r.gen_cores, "failed": r.failed,
                "cpu_ms_per_case": run.cpu_ms_per_case, "steal_cores": r.usage.steal_cores if r.usage else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=_variant, action="append", required=True,
                        help="NAME=PATH[,KEY=VALUE...]: a source tree and environment (give two or more)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--intake", type=int, default=2_000, help="messages per intake run (0: none)")
    parser.add_argument("--latency", type=int, default=0, help="mails per latency run (0: none)")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--floor", action="store_true", help="run the cycle floor on both loops in each round")
    parser.add_argument("--out", type=Path, help="JSON file for all runs")
    args = parser.parse_args(argv)
    baselines = (("bare", False), ("bare uvloop", True))
    floors = (("floor", False), ("floor uvloop", True))
    runs: list[dict[str, Any]] = []
    first = 0
    for rnd in range(args.rounds):
        order = args.variant if rnd % 2 == 0 else args.variant[::-1]
        base: dict[str, float] = {}
        if args.intake:
            for name, uv in baselines:
                first += 1_000_000
                result = _bare(args.intake, uv, first)
                base[name] = result["rate"]
                runs.append({"round": rnd, "variant": name, "kind": "intake", **result})
                print(f"round {rnd + 1} {name}: {result['rate']:.0f} msg/s gen {result['gen_cores']:.2f}",
                      file=sys.stderr, flush=True)
            for name, uv in floors if args.floor else ():
                result = _floor(args.intake, uv)
                base[name] = result["cycle"]
                runs.append({"round": rnd, "variant": name, "kind": "cycle", **result})
                print(f"round {rnd + 1} {name}: cycle {result['cycle']:.0f}/s cpu {result['cpu_ms_per_case']:.2f} "
                      f"ms/case gen {result['gen_cores']:.2f}", file=sys.stderr, flush=True)
        for v in order:
            name = v.name
            if args.intake:
                first += 1_000_000
                result = _intake(v, args.intake, first)
                result["ratio"] = result["rate"] / base["bare"]
                if "floor" in base:
                    result["floor_ratio"] = result["cycle"] / base["floor"]
                runs.append({"round": rnd, "variant": name, "kind": "intake", **result})
                print(f"round {rnd + 1} {name}: intake {result['rate']:.0f} msg/s ({result['ratio']:.2f}x bare) "
                      f"cycle {result['cycle']:.0f}/s cpu {result['cpu_ms_per_case']:.2f} ms/case "
                      f"gen {result['gen_cores']:.2f} failed {result['failed']}", file=sys.stderr, flush=True)
            if args.latency:
                first += 1_000_000
                result = _latency(v, args.latency, args.rate, first)
                runs.append({"round": rnd, "variant": name, "kind": "latency", **result})
                print(f"round {rnd + 1} {name}: latency p50 {result['p50_ms']:.1f} p99 {result['p99_ms']:.1f} "
                      f"max {result['max_ms']:.0f} ms ({result['timed']} timed) cpu {result['cpu_ms_per_case']:.2f} "
                      f"ms/case steal {result['steal_cores']:.2f}", file=sys.stderr, flush=True)
    print(summary(runs))
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))
    return 0


def summary(runs: list[dict[str, Any]]) -> str:
    """Per variant: medians over the rounds, and every round's value."""
    lines = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        for kind, keys in (("intake", ("rate", "ratio", "cycle", "floor_ratio", "cpu_ms_per_case", "gen_cores",
                                       "server_cores")),
                           ("cycle", ("cycle", "cpu_ms_per_case", "gen_cores", "server_cores")),
                           ("latency", ("p50_ms", "p99_ms", "max_ms", "timed", "cpu_ms_per_case", "steal_cores"))):
            mine = [r for r in runs if r["variant"] == name and r["kind"] == kind]
            if not mine:
                continue
            cells = []
            for key in keys:
                values = [r[key] for r in mine if r.get(key) is not None]
                if values:
                    cells.append(f"{key} {statistics.median(values):.2f} [{' '.join(f'{v:.2f}' for v in values)}]")
            lines.append(f"{name:14} {kind:8} " + "; ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
