"""kill -9 under load: customer mails and staff answers flow while the daemon's processes are
SIGKILLed and restarted at random moments. Every 250 ends in a forward (customer mail) or an
answer (staff reply); duplicates are counted and stay within one per kill; at the end every case
is answered and purged, both SQLite files pass integrity_check, and the log holds no marker.

CARESERVICE_RELIABILITY_SCALE=20 makes the full run (>= 200 kills); the default is 10 kills.
CARESERVICE_RELIABILITY_SEED replays one run."""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import pytest

from careservice.bootstrap import build_context
from careservice.config import load_config
from careservice.crypto import Keyring
from careservice.model import Envelope
from careservice.model import Source
from careservice.store import NewMessage
from careservice.store import Store
from careservice.worker import CaseWorker
from tests.reliability.helpers import IDLE
from tests.reliability.helpers import SCALE
from tests.reliability.helpers import RawSmtp
from tests.reliability.helpers import children
from tests.reliability.helpers import integrity
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import set_keys
from tests.reliability.helpers import status
from tests.reliability.helpers import stored_rows
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import free_port
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

KILLS = 10 * SCALE
SEED = int(os.environ.get("CARESERVICE_RELIABILITY_SEED", str(random.randrange(1 << 30))))
SENDERS = 2
PAUSE = 0.1  # seconds between two mails of one sender
GIVE_UP = 120.0  # a single message that cannot get a 250 for this long fails the test


@dataclass
class Load:
    """Customer senders and a staff answerer running against one daemon, retrying every refusal."""

    daemon: Daemon
    relay: CaptureRelay
    stop_new: threading.Event = field(default_factory=threading.Event)
    stop_all: threading.Event = field(default_factory=threading.Event)  # the test ends: no more sending at all
    accepted: set[int] = field(default_factory=set)  # customer mail numbers that got a 250
    answered: dict[str, int] = field(default_factory=dict)  # reply address -> mail number, reply got a 250
    sent: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def port(self) -> int:
        return self.daemon.smtp_port

    def deliver(self, sender: str, rcpt: str, raw: bytes) -> bool:
        """Send until a 250; False only if that takes longer than GIVE_UP seconds."""
        deadline = time.monotonic() + GIVE_UP
        while time.monotonic() < deadline and not self.stop_all.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port(), timeout=30) as client:
                    client.sendmail(sender, [rcpt], raw)
                return True
            except (OSError, smtplib.SMTPException) as exc:
                with self.lock:
                    self.refusals[type(exc).__name__] += 1
                    if getattr(exc, "smtp_code", 0) == -1:  # smtplib: a reply line without a numeric code
                        self.errors.append(f"garbled reply {exc}")
                time.sleep(0.05)
        return False

    def customers(self, first: int) -> None:
        number = first
        while not self.stop_new.is_set():
            marker = f"kill-c{number}-mark"
            raw = customer_mail(f"Subject {marker}", f"Body {marker}", sender=f"c{number}@customer.example",
                                name=f"Name {marker}", message_id=f"<kill-c{number}@customer.example>")
            with self.lock:
                self.sent += 1
            if self.deliver(f"c{number}@customer.example", CARE, raw):
                with self.lock:
                    self.accepted.add(number)
            else:
                self.errors.append(f"customer mail {number} never accepted")
            number += SENDERS
            time.sleep(PAUSE)

    def answer_new_forwards(self) -> int:
        """Answer every forwarded case not answered yet; returns how many were answered now."""
        done = 0
        for captured in self.relay.to(STAFF):
            if self.stop_all.is_set():
                break
            forward = captured.message
            if "Auto-Submitted" in forward or "kill-c" not in str(forward["Subject"]):
                continue
            address = forward["Reply-To"].addresses[0].addr_spec
            if address in self.answered:
                continue
            number = int(re.search(r"kill-c(\d+)-mark", str(forward["Subject"])).group(1))
            reply = staff_reply(forward, f"Answer kill-a{number}-mark")
            if self.deliver(STAFF, address, reply):
                self.answered[address] = number
                done += 1
            elif not self.stop_all.is_set():
                self.errors.append(f"answer for mail {number} never accepted")
        return done

    def staff(self) -> None:
        while not self.stop_new.is_set():
            if not self.answer_new_forwards():
                time.sleep(0.1)


@dataclass
class Tally:
    """What reached the relay of the mail a Load got accepted: losses and duplicates."""

    lost: list[int]  # customer mails accepted, never forwarded
    lost_answers: list[int]  # staff answers accepted, never delivered
    forwarded: int
    cases: int
    duplicate_cases: int  # one mail opened more than one case
    duplicate_forwards: int  # one forward sent more than once
    duplicate_answers: int
    answers_delivered: int

    def line(self, load: Load) -> str:
        return (f"sent={load.sent} accepted={len(load.accepted)} forwarded={self.forwarded} lost={len(self.lost)} "
                f"cases={self.cases} duplicate_cases={self.duplicate_cases} "
                f"duplicate_forwards={self.duplicate_forwards} answers_accepted={len(load.answered)} "
                f"answers_delivered={self.answers_delivered} answers_lost={len(self.lost_answers)} "
                f"duplicate_answers={self.duplicate_answers}")

    def check(self, kills: int) -> None:
        assert self.lost == [], f"accepted but never forwarded: {self.lost[:10]}"
        assert self.lost_answers == [], f"answer accepted but never delivered: {self.lost_answers[:10]}"
        assert self.duplicate_cases + self.duplicate_forwards + self.duplicate_answers <= kills


def tally(load: Load) -> Tally:
    forwards: dict[int, Counter[str]] = {}  # mail number -> reply address -> copies
    for captured in load.relay.to(STAFF):
        match = re.search(r"kill-c(\d+)-mark", str(captured.message["Subject"]))
        if match and "Auto-Submitted" not in captured.message:
            forwards.setdefault(int(match.group(1)), Counter())[captured.message["Reply-To"]
                                                              .addresses[0].addr_spec] += 1
    answers: Counter[int] = Counter()
    for captured in load.relay.received:
        match = re.search(rb"kill-a(\d+)-mark", captured.raw)
        if match and captured.rcpt_tos[0].startswith("c"):
            answers[int(match.group(1))] += 1
    answered_numbers = Counter(load.answered.values())
    return Tally(
        lost=sorted(load.accepted - set(forwards)),
        lost_answers=sorted(n for n in answered_numbers if answers[n] == 0),
        forwarded=len(forwards), cases=sum(len(c) for c in forwards.values()),
        duplicate_cases=sum(len(cases) - 1 for cases in forwards.values()),
        duplicate_forwards=sum(n - 1 for cases in forwards.values() for n in cases.values()),
        duplicate_answers=sum(max(0, answers[n] - answered_numbers[n]) for n in answers),
        answers_delivered=sum(answers.values()),
    )


def settled(load: Load, label: str, kills: int, counts: dict[str, object]) -> None:
    """Print what the load's mail came to; nothing lost, duplicates within the kills, the store idle."""
    result = tally(load)
    print(f"{label} {result.line(load)} client_retries={dict(load.refusals)} final={counts}")
    result.check(kills)
    assert counts == IDLE


def kill(daemon: Daemon, rng: random.Random) -> str:
    """SIGKILL the intake process, the workers, or both; restart what the daemon does not restart itself."""
    assert daemon.proc is not None
    workers = children(daemon.proc.pid)
    what = rng.choice(["intake", "worker", "both"]) if workers else "intake"
    if what in ("worker", "both"):
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    if what in ("intake", "both"):
        daemon.kill()
        daemon.start()
    return what


def test_worker_restart_writes_nothing_into_client_connections(tmp_path: Path, relay: CaptureRelay) -> None:
    """While the worker is down, the intake must not write its wake-up byte into a reused descriptor."""
    daemon = Daemon(write_config(tmp_path, relay.port)).start()
    sessions: list[RawSmtp] = []
    try:
        assert daemon.proc is not None
        for pid in children(daemon.proc.pid):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "worker_exited" in daemon.log.read_text(), what="worker restart pending")
        sessions = [RawSmtp(daemon.smtp_port) for _ in range(8)]  # take the lowest free descriptors
        send(daemon.smtp_port, "w@customer.example", [CARE], customer_mail("wake", "wake the worker"))
        replies = [s.command(b"NOOP") for s in sessions]
        assert all(r.startswith(b"250 ") for r in replies), replies
        wait_for(lambda: relay.to(STAFF), what="forward by the restarted worker")
    finally:
        for session in sessions:
            session.close()
        daemon.stop()


@pytest.mark.parametrize(("workers", "kills"), [(1, KILLS), (2, max(2, KILLS // 5))])  # 2: a shorter round
def test_kill9_under_load_loses_nothing(tmp_path: Path, relay: CaptureRelay, workers: int, kills: int) -> None:
    rng = random.Random(SEED)
    print(f"seed={SEED} kills={kills} workers={workers}")
    config = set_keys(write_config(tmp_path, relay.port, retry_delays="[1]"), "service", workers=workers)
    daemon = Daemon(config).start()
    load = Load(daemon, relay)
    # daemon threads, stopped by stop_all: one left behind by a failure must not keep pytest from exiting
    threads = [threading.Thread(target=load.customers, args=(i,), daemon=True) for i in range(SENDERS)]
    threads.append(threading.Thread(target=load.staff, daemon=True))
    kinds: Counter[str] = Counter()
    try:
        for thread in threads:
            thread.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.5))
            kinds[kill(daemon, rng)] += 1
        load.stop_new.set()
        for thread in threads:
            thread.join(GIVE_UP + 30)
        assert not [thread for thread in threads if thread.is_alive()], "a sender still running"
        assert not load.errors, load.errors[:5]
        # answer what is still open, then everything must drain and purge
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and status(daemon) != IDLE:
            load.answer_new_forwards()
            time.sleep(0.2)
        counts = status(daemon)
    finally:
        load.stop_new.set()
        load.stop_all.set()
        daemon.stop()

    settled(load, f"kill -9: workers={workers} kills={sum(kinds.values())} {dict(kinds)}", kills, counts)
    assert integrity(daemon.data_dir) == ["ok", "ok"]
    assert stored_rows(daemon.data_dir) == {"cases": 0, "outbox": 0, "k.keys": 0}
    assert log_leaks(daemon, ["kill-c", "kill-a", "@customer.example", "Name kill"]) == []


async def test_a_commit_cut_between_the_two_files_does_not_swallow_the_retry(tmp_path: Path) -> None:
    """SQLite commits an ATTACHed WAL transaction file by file, main (cases.db) first. A kill between
    the two leaves the case without its key (swept at start, and no 250 was sent); the client's retry
    must then make a new case, not be taken for a message already stored."""
    keyring = Keyring(b"k" * 32)
    message = NewMessage("ticketnest", Source.SMTP, Envelope("a@customer.example", CARE), b"Subject: x\r\n\r\nx",
                         dedupe=b"d" * 32)
    store = Store(tmp_path, keyring)
    await store.start(sweep=True)
    await store.add_inbound([message], time.time())
    await store.close()
    keys = sqlite3.connect(tmp_path / "keys.db")  # undo what the second file's commit would have written
    for (table,) in keys.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
        keys.execute(f"DELETE FROM {table}")
    keys.commit()
    keys.close()
    store = Store(tmp_path, keyring)
    await store.start(sweep=True)
    try:
        assert (await store.counts())["inbound_pending"] == 0  # the half-written case is gone
        assert (await store.add_inbound([message], time.time()))[0] != ""  # the retry is a new case
    finally:
        await store.close()


async def test_a_purge_cut_between_the_two_files_leaves_no_key_once_the_worker_restarts(tmp_path: Path) -> None:
    """A worker killed after a purge's cases.db commit and before its keys.db commit leaves the key
    behind; the restarted worker drops it when it starts (the intake may not restart for months)."""
    config = load_config(write_config(tmp_path, free_port()))
    intake = build_context(config, intake=True)[1]
    await intake.start(sweep=True)
    await intake.add_inbound([NewMessage("ticketnest", Source.SMTP, Envelope("a@customer.example", CARE),
                                         b"Subject: x\r\n\r\nx")], time.time())
    try:
        cases = sqlite3.connect(config.data_dir / "cases.db")  # what the purge's first file commit did
        cases.execute("DELETE FROM cases")
        cases.commit()
        cases.close()
        assert stored_rows(config.data_dir) == {"cases": 0, "outbox": 0, "k.keys": 1}
        worker = CaseWorker(config)
        await worker.start()
        await worker.stop(5)
        assert stored_rows(config.data_dir) == {"cases": 0, "outbox": 0, "k.keys": 0}
    finally:
        await intake.close()
