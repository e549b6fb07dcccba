"""Lawful disclosure end to end: `careservice cases --json` and `careservice export` against a running daemon."""

from __future__ import annotations

import json
import mailbox
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.test_workflow import CUSTOMER
from tests.test_workflow import open_case


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "careservice", *args, "--config", str(daemon.config)],
                          capture_output=True, text=True, timeout=60)


def test_cases_lists_the_owner_and_export_writes_the_open_case(daemon: Daemon, relay: CaptureRelay,
                                                               tmp_path: Path) -> None:
    forward = open_case(daemon, relay, customer_mail("Lost marmot", "Order 4711 marmot is lost"))
    case_id = re.search(r"#([0-9a-f]{12})\]", str(forward["Subject"])).group(1)  # type: ignore[union-attr]
    address = forward["Reply-To"].addresses[0].addr_spec
    send(daemon.smtp_port, STAFF, [address], staff_reply(forward, "#assign second"))
    wait_for(lambda: len(relay.to(STAFF2)) == 2, what="assignment")
    listed = cli(daemon, "cases", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["id"] == case_id and entry["site"] == "ticketnest" and entry["state"] == "open"
    assert entry["owner"] == STAFF2 and isinstance(entry["age"], int) and 0 <= entry["age"] < 60
    assert "marmot" not in listed.stdout and CUSTOMER not in listed.stdout
    out = tmp_path / "case.mbox"
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="queue drained")
    tried = relay.attempts
    relay.replies.extend(["451 4.3.0 later"] * 3)  # a note still queued goes into the export
    send(daemon.smtp_port, STAFF, [address], staff_reply(forward, "#note marmot owner called"))
    wait_for(lambda: relay.attempts > tried, what="note attempted")
    exported = cli(daemon, "export", "--case", case_id, "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    messages = list(mailbox.mbox(out))
    assert "Order 4711 marmot is lost" in messages[0].get_payload()
    assert any("marmot owner called" in m.as_string() for m in messages[1:-1])
    assert CUSTOMER in messages[-1].get_payload() and case_id in str(messages[-1]["Subject"])
    assert "marmot" not in exported.stderr and CUSTOMER not in exported.stderr and case_id in exported.stderr
    conn = sqlite3.connect(daemon.data_dir / "cases.db")
    assert conn.execute("SELECT value FROM stats WHERE name='disclosures' AND site='ticketnest'").fetchone() == (1,)
    conn.close()
    assert cli(daemon, "export", "--case", case_id, "--out", str(out)).returncode == 1  # never overwrites
    mine = relay.to(STAFF2)[-1].message  # the owner answers from the forward assigned to them (their token)
    send(daemon.smtp_port, STAFF2, [mine["Reply-To"].addresses[0].addr_spec], staff_reply(mine, "#closed",
                                                                                           sender=STAFF2))
    wait_for(lambda: daemon.status()["open_cases"] == 0, what="closed")
    gone = cli(daemon, "export", "--case", case_id, "--out", str(tmp_path / "again.mbox"))
    assert gone.returncode == 3 and "not open" in gone.stderr and not (tmp_path / "again.mbox").exists()
    assert json.loads(cli(daemon, "cases", "--json").stdout) == []
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="purge")
    assert files_containing(daemon.data_dir, [b"marmot", CUSTOMER.encode()]) == []
