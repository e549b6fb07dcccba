"""contrib/systemd/careservice.service: systemd-analyze accepts it, and its sandbox allows what the daemon needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / "careservice.service"
INSTALLED = "/opt/careservice/bin/careservice"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def settings(name: str) -> list[str]:
    """The values of every `name=` line, in order."""
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(name + "=")]


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify rejects an ExecStart binary that does not exist: point it at this venv's script instead
    script = Path(sys.executable).parent / "careservice"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={script if script.exists() else '/bin/true'} "))
    result = subprocess.run([ANALYZE or "", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert about_unit == [] and result.returncode == 0, result.stdout + result.stderr


def syscall_set(group: str) -> set[str]:
    """A systemd syscall group, nested groups expanded."""
    out = subprocess.run([ANALYZE or "", "syscall-filter", group], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    names: set[str] = set()
    for line in (line.strip() for line in out.splitlines()[1:]):
        if line and not line.startswith("#"):
            names |= syscall_set(line) if line.startswith("@") else {line}
    return names


@needs_analyze
def test_syscall_filter_allows_the_workers_setpriority() -> None:
    """The worker calls os.nice(10), i.e. setpriority, which @resources holds. Applied in order as systemd
    does: the first line is the allow list, a later `~` line removes from it, a later plain line adds."""
    lines = settings("SystemCallFilter")
    assert not lines[0].startswith("~")
    allowed: set[str] = set()
    for line in lines:
        names = set().union(*(syscall_set(n) if n.startswith("@") else {n} for n in line.lstrip("~").split()))
        allowed = allowed - names if line.startswith("~") else allowed | names
    assert "setpriority" in syscall_set("@resources")
    assert {"setpriority", "flock", "sendto", "bind"} <= allowed
    assert not {"setrlimit", "sched_setaffinity", "chown", "setuid"} & allowed


def test_stop_timeout_outlasts_the_drain() -> None:
    """systemd must not SIGKILL a drain that service.stop_timeout (default 30 s) still allows."""
    assert int(settings("TimeoutStopSec")[0].removesuffix("s")) > 30
