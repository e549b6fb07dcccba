"""`python -m bench.instructions`: the case worker's instructions per case, counted by callgrind, for A/B runs
that the host's noise cannot move.

CPU time on this shared host varies 10-25 % between runs, more than most single changes to the worker save.
Valgrind's callgrind counts the instructions a process executes in user space (not the kernel's work for its
system calls, nor time spent waiting), the same whatever else the machine runs. Per variant (a source tree, as
bench.ab takes them), `python -m bench.worker --rounds 1` runs under callgrind twice, with --small and --large
cases; (I_large - I_small) / (large - small) is what one more case costs, filled as the intake commits it and
drained by the worker to smtp-sink, without the interpreter's start-up and imports. The runs go two at a time
(one per core); a variant's two counts differ only by its cases, so the cost of a change is the difference of
two variants' figures. Under callgrind a run is about 50 times slower: 300 and 600 cases take some minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.ab import Variant, _variant
from bench.servers import tree_env

RUN_SECONDS = 3600  # bounds one run under callgrind, which takes minutes
_TOTALS = re.compile(r"^totals: (\d+)$", re.M)


def instructions(variant: Variant, cases: int) -> int:
    """The instructions of one `bench.worker` round of `cases` cases from the variant's tree (with its
    environment), start-up included."""
    tree = variant.tree
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="careservice-instructions-") as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run([valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
                        "bench.worker", "--cases", str(cases), "--rounds", "1"],
                       cwd=tree, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **tree_env(tree), **variant.env},
                       check=True, capture_output=True, timeout=RUN_SECONDS)
        found = _TOTALS.search(out.read_text(errors="replace"))
        if found is None:
            raise RuntimeError(f"no totals in callgrind's output of {tree}")
        return int(found.group(1))


def per_case(variants: list[Variant], small: int, large: int) -> dict[str, dict[str, float]]:
    """Per variant: its instructions per case, and the two runs' totals."""
    for v in variants:  # else the first run of a tree also counts the compiling of its bytecode
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(v.tree)], check=True, capture_output=True)
    runs = [(v, n) for v in variants for n in (small, large)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = list(pool.map(lambda run: instructions(*run), runs))
    total = dict(zip(((v.name, n) for v, n in runs), counts, strict=True))
    return {v.name: {"per_case": (total[v.name, large] - total[v.name, small]) / (large - small),
                     "small_total": total[v.name, small], "large_total": total[v.name, large]} for v in variants}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=_variant, action="append", required=True,
                        help="NAME=PATH[,ENV=VALUE...]: a source tree (a git worktree of the commit to count)")
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=600)
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    args = parser.parse_args(argv)
    if not 0 < args.small < args.large:
        parser.error("--small must be below --large, and above 0")
    if any(v.settings for v in args.variant):
        parser.error("bench.worker writes its own config: a variant takes environment variables, not settings")
    figures = per_case(args.variant, args.small, args.large)
    first = figures[args.variant[0].name]["per_case"]
    for name, figure in figures.items():
        print(f"{name}: {figure['per_case']:,.0f} instructions per case ({figure['per_case'] / first:.3f}x "
              f"{args.variant[0].name}); {figure['small_total']:,.0f} in all for {args.small} cases, "
              f"{figure['large_total']:,.0f} for {args.large}")
    if args.out:
        args.out.write_text(json.dumps({"small": args.small, "large": args.large, "variants": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
