"""Disk full: data_dir on an 8 MB tmpfs. Below smtp.min_free_bytes customer mail gets 452 at RCPT,
while staff answers to signed reply addresses are still taken down to smtp.reply_min_free_bytes (so
cases can be answered and purged), and below that MAIL gets 452; a commit that fails for lack of
space gets 451 and stores nothing; the store stays sound and the running daemon takes mail again as
soon as space returns (no restart)."""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from careservice.worker import WAL_CHECKPOINT_BYTES
from tests.reliability.helpers import integrity
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import set_keys
from tests.reliability.helpers import status
from tests.reliability.helpers import wal_copied
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

SIZE = 8 * 1024 * 1024  # room for the outgrown mail of the first test, its forwards and its purge
MIN_FREE = 1024 * 1024
REPLY_MIN_FREE = 256 * 1024  # smtp.reply_min_free_bytes in the headroom test
CUSTOMER = "disk.tester@customer.example"


@pytest.fixture
def small_data_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """tmp_path/data as a tmpfs of SIZE bytes, or the test's indirect parameter (root only); unmounted
    afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("disk-full test needs root to mount a tmpfs for data_dir")
    data = tmp_path / "data"
    data.mkdir()
    size = getattr(request, "param", SIZE)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(data)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield data
    finally:
        if subprocess.run(["umount", str(data)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(data)], check=True)


def fill(path: Path, leave: int) -> None:
    """Write `path` until only `leave` bytes are free on its file system (0: until ENOSPC)."""
    with path.open("ab") as f:
        while shutil.disk_usage(path.parent).free > leave:
            try:
                f.write(b"\0" * min(65536, max(4096, shutil.disk_usage(path.parent).free - leave)))
                f.flush()
            except OSError:
                break


def mail(marker: str, size: int = 60_000) -> bytes:
    return customer_mail(f"Subject {marker}", f"Body {marker} " + "x" * size, sender=CUSTOMER)


def intake_reply(daemon: Daemon, rcpt: str = CARE, sender: str = CUSTOMER) -> tuple[int, bytes]:
    """MAIL's answer if it refused, else RCPT's (where the daemon decides on low disk)."""
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
        client.ehlo()
        reply = client.mail(sender)
        return reply if reply[0] != 250 else client.rcpt(rcpt)


def forwarded(relay: CaptureRelay, marker: str) -> int:
    return sum(f"Subject {marker}" in str(c.message["Subject"]) for c in relay.to(STAFF))


def test_disk_full_refuses_cleanly_and_recovers(tmp_path: Path, small_data_dir: Path, relay: CaptureRelay) -> None:
    config = set_keys(write_config(tmp_path, relay.port, retry_delays="[1]"), "smtp", min_free_bytes=MIN_FREE,
                      max_message_bytes=1_000_000)
    daemon = Daemon(config).start()
    filler = small_data_dir / "filler"
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], mail("disk-before-mark"))
        wait_for(lambda: forwarded(relay, "disk-before-mark") == 1, what="forward before the disk fills")

        fill(filler, leave=MIN_FREE // 2)  # below the floor: refused before any data is sent
        wait_for(lambda: intake_reply(daemon)[0] == 452, timeout=5, what="452 below the floor")  # checked 4x/s
        assert intake_reply(daemon) == (452, b"4.3.1 Insufficient system storage")

        filler.unlink()  # room at MAIL time; then the disk fills up before the data arrives
        wait_for(lambda: intake_reply(daemon)[0] == 250, timeout=5, what="MAIL taken again")
        # below the floor the WAL was copied in whole (careservice.worker.WalCheckpointer), and a commit
        # then writes over its file, needing no new space: to need any, the mail must outgrow that file
        full = mail("disk-full-mark", (small_data_dir / "cases.db-wal").stat().st_size + 50_000)
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            client.ehlo()
            assert client.mail(CUSTOMER)[0] == 250 and client.rcpt(CARE)[0] == 250
            fill(filler, leave=0)
            code, text = client.data(full)
            assert client.noop()[0] == 250
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        assert status(daemon)["inbound_pending"] == 0  # nothing half-stored

        filler.unlink()  # space returns: the same daemon takes and delivers mail again
        wait_for(lambda: intake_reply(daemon)[0] == 250, timeout=5, what="MAIL taken again")
        send(daemon.smtp_port, CUSTOMER, [CARE], full)  # the client's retry
        send(daemon.smtp_port, CUSTOMER, [CARE], mail("disk-after-mark"))
        wait_for(lambda: forwarded(relay, "disk-after-mark") == 1 and forwarded(relay, "disk-full-mark") == 1,
                 timeout=30, what="forwards after recovery")
        wait_for(lambda: status(daemon)["outbound_queued"] == 0, what="queue drained")
        counts = {m: forwarded(relay, m) for m in ("disk-before-mark", "disk-full-mark", "disk-after-mark")}
        print(f"disk full: sent=5 accepted=3 refused_452=1 refused_451=1 forwarded={counts}")
        assert counts == {"disk-before-mark": 1, "disk-full-mark": 1, "disk-after-mark": 1}
        assert status(daemon)["open_cases"] == 3
    finally:
        daemon.stop()
    assert integrity(daemon.data_dir) == ["ok", "ok"]
    assert log_leaks(daemon, ["disk-", CUSTOMER, "Subject "]) == []


def test_deliveries_while_the_disk_is_full_are_not_repeated(tmp_path: Path, small_data_dir: Path,
                                                            relay: CaptureRelay) -> None:
    """The relay takes a mail but the store cannot record it: the mail must not go out again and again."""
    config = set_keys(write_config(tmp_path, relay.port, retry_delays="[1]"), "smtp", min_free_bytes=MIN_FREE)
    relay.stop()
    daemon = Daemon(config).start()
    filler = small_data_dir / "filler"
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], mail("disk-queued-mark"))
        wait_for(lambda: status(daemon)["outbound_queued"] == 3, what="forwards and ack queued")
        fill(filler, leave=0)
        relay.start()
        wait_for(lambda: relay.received, timeout=30, what="first delivery")
        time.sleep(8)  # several outbox rounds with the disk still full
        while_full = len(relay.received)
        filler.unlink()
        wait_for(lambda: status(daemon)["outbound_queued"] == 0, timeout=60, what="queue drained")
        forwards, acks = forwarded(relay, "disk-queued-mark"), len(relay.to(CUSTOMER))
        print(f"disk full during delivery: queued=2 sent_while_full={while_full} forwards={forwards} acks={acks}")
        assert (forwards, acks) == (1, 1)  # what the store could not record as delivered is not sent again
    finally:
        daemon.stop()
    assert integrity(daemon.data_dir) == ["ok", "ok"]


def test_staff_can_still_answer_below_the_floor(tmp_path: Path, small_data_dir: Path, relay: CaptureRelay) -> None:
    """Below min_free_bytes nothing new comes in, but a staff answer still does, is relayed, and its
    case purged: refusing it too would leave the disk full of cases nobody can close."""
    config = set_keys(write_config(tmp_path, relay.port, retry_delays="[1]"), "smtp", min_free_bytes=MIN_FREE,
                      reply_min_free_bytes=REPLY_MIN_FREE)
    daemon = Daemon(config).start()
    filler = small_data_dir / "filler"
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], mail("disk-answer-mark"))
        wait_for(lambda: forwarded(relay, "disk-answer-mark") == 1, what="the case forwarded before the disk fills")
        forward = next(c for c in relay.to(STAFF) if "disk-answer-mark" in str(c.message["Subject"])).message
        reply_to = str(forward["Reply-To"])
        local, domain = reply_to.split("@")
        forged = f"{local[:-16]}{'a' * 16}@{domain}"  # the same case and nonce, a wrong MAC
        assert forged != reply_to

        wait_for(lambda: status(daemon)["outbound_queued"] == 0, what="the forwards and ack recorded")
        fill(filler, leave=MIN_FREE - 100_000)  # below the floor, with room for the WAL's copy (~250 KB here)
        wait_for(lambda: wal_copied(small_data_dir), what="the WAL copied in below the floor")  # a filling disk
        # gives the checkpointer that time; an answer inside the same quarter second may find no room
        wait_for(lambda: intake_reply(daemon)[0] == 452, timeout=5, what="452 below the floor")  # checked 4x/s
        seen = {"customer": intake_reply(daemon), "forged_reply": intake_reply(daemon, forged, STAFF),
                "staff_reply": intake_reply(daemon, reply_to, STAFF)}
        assert seen["customer"] == seen["forged_reply"] == (452, b"4.3.1 Insufficient system storage"), seen
        assert seen["staff_reply"][0] == 250, seen  # a reply address counts only with our MAC
        send(daemon.smtp_port, STAFF, [reply_to], staff_reply(forward, "Answered on a full disk."))
        wait_for(lambda: any("Answered on a full disk." in c.raw.decode(errors="replace") for c in relay.to(CUSTOMER)),
                 timeout=30, what="the answer relayed to the customer")
        wait_for(lambda: status(daemon)["open_cases"] == 0 and status(daemon)["outbound_queued"] == 0,
                 what="the case purged")

        fill(filler, leave=REPLY_MIN_FREE // 2)  # below the second floor nothing is taken, from MAIL on
        wait_for(lambda: intake_reply(daemon, reply_to, STAFF)[0] == 452, timeout=5, what="452 below the reply floor")
        print(f"disk below floor: { {k: v[0] for k, v in seen.items()} } answer relayed, case purged; "
              f"below reply_min_free_bytes: {intake_reply(daemon, reply_to, STAFF)}")
    finally:
        daemon.stop()
    assert integrity(daemon.data_dir) == ["ok", "ok"]
    assert log_leaks(daemon, ["disk-", CUSTOMER, STAFF, "Subject ", "Answered"]) == []


@pytest.mark.parametrize("small_data_dir", [16 * 1024 * 1024], indirect=True)
def test_the_largest_answer_is_purged_on_a_disk_filled_to_the_reply_floor(tmp_path: Path, small_data_dir: Path,
                                                                          relay: CaptureRelay) -> None:
    """The disk fills in steps, as disks do, to just above reply_min_free_bytes (the floors in their default
    ratio to max_message_bytes); a staff answer of nearly max_message_bytes to a large case is still taken,
    relayed, and its case purged. The WAL's backlog is copied in while there is room for that."""
    largest = 1_000_000
    min_free, reply_min_free = largest * 3 // 2, largest // 2
    config = set_keys(write_config(tmp_path, relay.port, retry_delays="[1]"), "smtp", max_message_bytes=largest,
                      min_free_bytes=min_free, reply_min_free_bytes=reply_min_free)
    daemon = Daemon(config).start()
    filler = small_data_dir / "filler"
    try:
        text = os.urandom(225_000).hex()
        body = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Subject disk-large-mark", body, sender=CUSTOMER))
        wait_for(lambda: forwarded(relay, "disk-large-mark") == 1, what="the large case forwarded")
        forward = next(c for c in relay.to(STAFF) if "disk-large-mark" in str(c.message["Subject"])).message
        answer = staff_reply(forward, "Answered in full. " + body)  # the quote too: nearly max_message_bytes
        assert largest * 9 // 10 < len(answer) < largest

        fill(filler, leave=min_free + WAL_CHECKPOINT_BYTES - 100_000)  # near the floor: the WAL is copied in
        wait_for(lambda: wal_copied(small_data_dir), what="the WAL copied in near the floor")
        fill(filler, leave=reply_min_free + 100_000)
        wait_for(lambda: wal_copied(small_data_dir), what="the WAL copied in below the floor")
        wait_for(lambda: intake_reply(daemon)[0] == 452, timeout=5, what="452 below the floor")
        send(daemon.smtp_port, STAFF, [str(forward["Reply-To"])], answer)
        wait_for(lambda: any("Answered in full." in c.raw.decode(errors="replace") for c in relay.to(CUSTOMER)),
                 timeout=30, what="the answer relayed to the customer")
        wait_for(lambda: status(daemon)["open_cases"] == 0 and status(daemon)["outbound_queued"] == 0,
                 what="the case purged")
    finally:
        daemon.stop()
    assert integrity(daemon.data_dir) == ["ok", "ok"]
    assert log_leaks(daemon, ["disk-", CUSTOMER, STAFF, "Subject ", "Answered"]) == []
