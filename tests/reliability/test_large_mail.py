"""Large mail: a burst of near-limit messages must neither push the worker past
service.worker_memory_mb nor hold a staff answer back until the whole burst is forwarded.

The worker is stopped (SIGSTOP) while the burst and the answer arrive and then let go, so that
everything is waiting at once, as it is on a host where the intake takes mail faster than the
worker forwards it. CARESERVICE_RELIABILITY_SCALE>1 sends 64 messages of 9.4 MB instead of 8 of 9 MB."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from dataclasses import field
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.reliability.helpers import SCALE
from tests.reliability.helpers import children
from tests.reliability.helpers import set_keys
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

COUNT = 8 if SCALE == 1 else 64
SIZE = 9_000_000 if SCALE == 1 else 9_400_000  # bytes on the wire, base64 included
BUDGET_MB = 256
CUSTOMER = "small.case@customer.example"
LARGE = 1_000_000  # the relay counts mail this big instead of keeping it


@dataclass
class SizingRelay(CaptureRelay):
    """A capture relay that notes when each large mail arrived and keeps only the small ones."""

    large: list[float] = field(default_factory=list)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        if len(envelope.original_content) < LARGE:  # type: ignore[attr-defined]
            return await super().handle_DATA(server, session, envelope)
        with self._lock:
            self.large.append(time.monotonic())
        return "250 2.0.0 counted"


def large_mail(number: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Large Sender <large{number}@customer.example>"
    msg["To"] = CARE
    msg["Subject"] = f"large mail {number}"
    msg.set_content("Please see the attached scan.")
    msg.add_attachment(os.urandom(SIZE * 57 // 78), maintype="application", subtype="pdf", filename="scan.pdf")
    return msg.as_bytes(policy=policy.SMTP)


def vm_kb(pid: int, field_name: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field_name + ":"))
    return int(line.split()[1])


def stop_between_transactions(pid: int, lock: Path) -> None:
    """SIGSTOP the worker while it holds no store lock (a stopped holder would stall the intake's commits)."""
    inode = f":{os.stat(lock).st_ino}"
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                 what="worker stopped")
        held = [line.replace("->", "").split() for line in Path("/proc/locks").read_text().splitlines()]
        if not any(f[4] == str(pid) and f[5].endswith(inode) for f in held):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the worker always held the store lock")


def test_large_mail_burst_stays_within_the_memory_budget_and_answers_go_first(tmp_path: Path) -> None:
    relay = SizingRelay().start()
    config = set_keys(write_config(tmp_path, relay.port), "smtp", max_message_bytes=10_000_000)
    daemon = Daemon(set_keys(config, "service", worker_memory_mb=BUDGET_MB)).start()
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("small case", "Where are my tickets?", sender=CUSTOMER))
        wait_for(lambda: relay.to(STAFF) and relay.to(CUSTOMER), what="small case forwarded and acknowledged")
        forward = relay.to(STAFF)[0].message
        assert daemon.proc is not None
        (worker,) = children(daemon.proc.pid)
        before = vm_kb(worker, "VmHWM") // 1024
        stop_between_transactions(worker, daemon.data_dir / "write.lock")
        try:
            for number in range(COUNT):
                send(daemon.smtp_port, f"large{number}@customer.example", [CARE], large_mail(number))
            send(daemon.smtp_port, STAFF, [str(forward["Reply-To"])], staff_reply(forward, "On their way."))
        finally:
            os.kill(worker, signal.SIGCONT)
        resumed = time.monotonic()
        wait_for(lambda: len(relay.to(CUSTOMER)) == 2, timeout=60.0 * SCALE, what="the staff answer")
        answer_seconds = time.monotonic() - resumed
        forwarded_first = len(relay.large)
        wait_for(lambda: len(relay.large) == COUNT, timeout=60.0 * SCALE, what="every large mail forwarded")
        all_seconds = relay.large[-1] - resumed
        peak = vm_kb(worker, "VmHWM") // 1024
    finally:
        daemon.stop()
        relay.stop()
    print(f"large mail: {COUNT} x {SIZE / 1e6:.1f} MB, worker peak RSS {before} MB before the burst, {peak} MB "
          f"after (budget {BUDGET_MB} MB); answer after {answer_seconds:.1f} s with {forwarded_first} of {COUNT} "
          f"large mails forwarded; all forwarded after {all_seconds:.1f} s")
    assert peak < BUDGET_MB
    assert forwarded_first < COUNT
