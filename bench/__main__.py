"""`python -m bench [--quick] [--only 1,3]`: run the benchmarks, print the table, write JSON and SVG."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from bench import scenarios
    from bench.report import table, write_json, write_svg
    from bench.settings import FULL, QUICK

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, one repetition (under two minutes)")
    parser.add_argument("--only", default=",".join(scenarios.SCENARIOS),
                        help="comma-separated scenario numbers (default: all, 1-7)")
    parser.add_argument("--reps", type=int, help="repetitions of scenario 1 and of scenario 2's full cycle "
                                                 "(median reported; default 1 quick, 3 full)")
    parser.add_argument("--workers", type=int, default=1, help="service.workers of scenario 2's daemon (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON and SVG (default bench/results)")
    args = parser.parse_args(argv)
    selected = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = [key for key in selected if key not in scenarios.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(scenarios.SCENARIOS)})")
    # SIGTERM (kill, timeout) unwinds as Ctrl-C does, so the servers a scenario started (a private
    # Postfix is a daemon of its own) are stopped by its finally blocks rather than left running
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = replace(settings, reps=args.reps)
    settings = replace(settings, workers=args.workers)
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    rows = scenarios.run(selected, settings, log)
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{'quick' if args.quick else 'full'}"
    settings_dict = {**vars(settings), "intake_count": {str(k): v for k, v in settings.intake_count.items()},
                     "scenarios": selected, "seconds": time.monotonic() - started}
    write_json(stem.with_suffix(".json"), rows, settings_dict)
    write_svg(stem.with_suffix(".svg"), rows, f"careservice benchmarks ({'quick' if args.quick else 'full'} run)")
    print(f"\nwrote {stem}.json and {stem}.svg ({time.monotonic() - started:.0f} s in all)")
    return 1 if any(r.verdict == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
