"""service.workers: several worker processes, each taking the cases and mail of its own shard (SQLite) or
its own claims (PostgreSQL); every mail forwarded, acknowledged and answered once, and nothing left."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest

from careservice.bootstrap import build_context
from careservice.config import ConfigError
from careservice.config import load_config
from careservice.crypto import Keyring
from careservice.model import CaseState
from careservice.model import Envelope
from careservice.model import MailKind
from careservice.model import OutgoingMail
from careservice.model import Source
from careservice.settings import StoreConfig
from careservice.store import NewMessage
from careservice.store import Store
from careservice.store import mailq
from careservice.worker import CaseWorker
from tests.postgres import case_rows
from tests.postgres import with_store
from tests.reliability.helpers import children
from tests.reliability.helpers import set_keys
from tests.reliability.mailclients import thunderbird
from tests.reliability.replycase import answers
from tests.reliability.replycase import case_id
from tests.reliability.replycase import new_text
from tests.reliability.replycase import notices
from tests.reliability.replycase import open_case
from tests.reliability.replycase import reply_address
from tests.reliability.replycase import settled
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import with_routes
from tests.support import write_config
from tests.test_routing import ROTA
from tests.test_routing import ROUND_ROBIN
from tests.test_routing import forwards

IDLE = {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0}
MAILS = 24
RELAY_CONNECTIONS = 4  # relay.connections (default): each sends one mail at a time
RACES = 2  # cases answered twice at once: each pair of replies falls in two shards with odds of one in two
RR_CASES = 9  # three turns for each of the route's three staff members


def test_workers_is_a_number_from_1_to_16(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    assert load_config(config).workers == 1
    assert load_config(set_keys(config, "service", workers=2)).workers == 2
    for bad in (0, 17):
        with pytest.raises(ConfigError, match="from 1 to 16") as raised:
            load_config(set_keys(config, "service", workers=bad))
        assert raised.value.key == "service.workers"
    result = subprocess.run([sys.executable, "-m", "careservice", "check", "--config", str(set_keys(config, "service",
                                                                                               workers=0))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "service.workers" in result.stderr


async def test_the_shards_of_the_due_cases_and_mail_are_disjoint_and_cover_all(tmp_path: Path) -> None:
    keyring = Keyring(b"k" * 32)
    intake = Store(tmp_path, keyring)
    await intake.start(sweep=True)
    now = time.time()
    ids = await intake.add_inbound([NewMessage("ticketnest", Source.SMTP, Envelope(f"c{i}@customer.example", CARE),
                                               b"Subject: x\r\n\r\nx") for i in range(64)], now)
    for case in ids:  # a mail queued under each case: it goes with its case's shard
        await intake.executor.call(mailq.queue_mail, "ticketnest", OutgoingMail(
            MailKind.FORWARD, case, CARE, (STAFF,), b"Subject: f\r\n\r\nf", f"<{case}@care.test>"), now)
    await intake.close()
    for of in (1, 2, 3):
        cases: list[set[str]] = []
        mail: list[set[str]] = []
        for index in range(of):
            worker = Store(tmp_path, keyring, durable=False, inline=True, shard=(index, of))
            await worker.start(sweep=False)
            try:
                cases.append({c.id for c in await worker.due_cases([CaseState.RECEIVED], now + 1, 100, 10 ** 9,
                                                                   set())})
                mail.append({m.mail.case_id for m in await worker.due_mail(now + 1, 100, 10 ** 9)})
            finally:
                await worker.close()
        for taken in (cases, mail):
            assert set().union(*taken) == set(ids)
            assert sum(len(shard) for shard in taken) == len(ids)  # no case in two shards
            assert all(taken)  # 64 random ids: every shard has some
        assert cases == mail  # a case's mail goes to the worker that takes the case


async def test_a_stop_lets_the_scheduled_job_in_flight_finish(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stopped while its start's sweep runs (as when its daemon is killed right after a restart), the worker lets the
    sweep finish: APScheduler's shutdown cancels a job still running and logs that at ERROR, which pages an operator."""
    config = load_config(write_config(tmp_path, 1))  # port 1: nothing is due, no relay is dialled
    intake = build_context(config, intake=True)[1]  # the master key and the store, as the daemon's main process
    await intake.start(sweep=True)
    await intake.close()
    caplog.set_level(logging.INFO, logger="apscheduler")
    worker = CaseWorker(config)
    await worker.start()
    deadline = time.monotonic() + 10
    # each loop turn: the stop comes while the sweep waits for its first store call, its calls take a few turns
    while not any(r.getMessage().startswith("Running job") and "sweep" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the sweep did not start"
        await asyncio.sleep(0)
    await worker.stop(10)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("sweep" in r.getMessage() and r.getMessage().endswith("executed successfully") for r in caplog.records)


def _workers(daemon: Daemon) -> dict[int, int]:
    """index -> pid of the daemon's worker children."""
    assert daemon.proc is not None
    found = {}
    for pid in children(daemon.proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"worker" in args:
            found[int(args[args.index(b"--index") + 1])] = pid
    return found


def _customer(i: int) -> str:
    return f"c{i}@customer{i}.example"  # a domain each: acknowledgements are limited per domain and hour


def _send_customers(daemon: Daemon, numbers: range) -> None:
    for i in numbers:
        send(daemon.smtp_port, _customer(i), [CARE], customer_mail(f"Question w{i}-mark", f"Body w{i}-mark",
                                                                   sender=_customer(i), name=f"Name w{i}"))


def _forwards(relay: CaptureRelay) -> dict[int, list[str]]:
    """Mail number -> the reply addresses of the forwards STAFF got for it."""
    found: dict[int, list[str]] = {}
    for captured in relay.to(STAFF):
        match = re.search(r"w(\d+)-mark", str(captured.message["Subject"]))
        if match and "Auto-Submitted" not in captured.message:
            found.setdefault(int(match.group(1)), []).append(captured.message["Reply-To"].addresses[0].addr_spec)
    return found


def _answers(relay: CaptureRelay, i: int) -> int:
    return sum(1 for c in relay.to(_customer(i)) if "Auto-Submitted" not in c.message)


def _answer_all_and_drain(daemon: Daemon, relay: CaptureRelay, count: int, store: StoreConfig) -> None:
    """Answer every forward; each customer gets one answer, and nothing of any case is left."""
    answered: set[str] = set()
    for captured in relay.to(STAFF):
        address = captured.message["Reply-To"].addresses[0].addr_spec
        if re.search(r"w\d+-mark", str(captured.message["Subject"])) and address not in answered:
            answered.add(address)  # a forward sent twice (a kill) is answered once
            send(daemon.smtp_port, STAFF, [address], staff_reply(captured.message, "Answer"))
    wait_for(lambda: all(_answers(relay, i) for i in range(count)), timeout=60, what="every answer relayed")
    wait_for(lambda: daemon.status() == IDLE, timeout=60, what="every case purged")
    assert [i for i in range(count) if _answers(relay, i) != 1] == []
    assert case_rows(store, daemon.data_dir) == 0


@pytest.fixture
def two_workers(tmp_path: Path, relay: CaptureRelay, store_backend: StoreConfig) -> Path:
    return with_store(set_keys(write_config(tmp_path, relay.port), "service", workers=2), store_backend)


def test_two_workers_forward_acknowledge_and_answer_each_mail_once(two_workers: Path, relay: CaptureRelay,
                                                                    store_backend: StoreConfig) -> None:
    daemon = Daemon(two_workers).start()
    try:
        assert sorted(_workers(daemon)) == [0, 1]
        _send_customers(daemon, range(MAILS))
        wait_for(lambda: len(_forwards(relay)) == MAILS and all(relay.to(_customer(i)) for i in range(MAILS)),
                 timeout=60, what="every forward and ack")
        assert {i: len(r) for i, r in _forwards(relay).items()} == dict.fromkeys(range(MAILS), 1)
        assert [i for i in range(MAILS) if len(relay.to(_customer(i))) != 1] == []  # one ack each
        _answer_all_and_drain(daemon, relay, MAILS, store_backend)
        log = daemon.log.read_text()
        assert "worker_started index=0 of=2" in log and "worker_started index=1 of=2" in log
        if not store_backend.shared:  # both shards had cases: each was advanced by its own worker
            digits = {int(case[-1], 16) % 2 for case in re.findall(r"case_advanced case=([0-9a-f]+)", log)}
            assert digits == {0, 1}
            assert sorted(p.name for p in daemon.data_dir.glob("worker*.lock")) == ["worker-1.lock", "worker.lock"]
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)
def test_a_killed_worker_is_restarted_and_its_shard_loses_nothing(two_workers: Path, relay: CaptureRelay,
                                                                  store_backend: StoreConfig) -> None:
    daemon = Daemon(two_workers).start()
    try:
        _send_customers(daemon, range(MAILS // 2))
        before = _workers(daemon)
        os.kill(before[1], signal.SIGKILL)
        _send_customers(daemon, range(MAILS // 2, MAILS))  # some land in the dead worker's shard
        wait_for(lambda: "worker_exited index=1" in daemon.log.read_text(), what="the exit seen")
        wait_for(lambda: _workers(daemon).get(1, before[1]) != before[1], what="worker 1 restarted")
        assert _workers(daemon)[0] == before[0]  # the other worker ran on
        wait_for(lambda: len(_forwards(relay)) == MAILS and all(relay.to(_customer(i)) for i in range(MAILS)),
                 timeout=60, what="every forward and ack")
        copies = [len(r) - 1 for r in _forwards(relay).values()] + [len(relay.to(_customer(i))) - 1
                                                                    for i in range(MAILS)]
        assert sum(copies) <= RELAY_CONNECTIONS  # at most one mail in flight on each of the dead worker's connections
        _answer_all_and_drain(daemon, relay, MAILS, store_backend)
    finally:
        assert daemon.stop() == 0


def test_two_workers_hand_round_robin_turns_out_once_each(tmp_path: Path, relay: CaptureRelay) -> None:
    """Both workers take turns of one route: a turn the other took meanwhile is taken again at once (no
    hold), and no turn goes to two cases."""
    config = write_config(tmp_path, relay.port, sites=with_routes(ROUND_ROBIN))
    daemon = Daemon(set_keys(config, "service", workers=2)).start()
    try:
        for n in range(RR_CASES):
            send(daemon.smtp_port, _customer(n), [CARE], customer_mail(f"Refund {n}", "please", sender=_customer(n)))
        wait_for(lambda: all(forwards(relay, f"Refund {n}") for n in range(RR_CASES)), what="every forward")
        owners = Counter(a for n in range(RR_CASES) for c in forwards(relay, f"Refund {n}") for a in c.rcpt_tos)
        assert sorted(owners.values()) == [3, 3, 3] and set(owners) == set(ROTA)
        assert "case_stage_failed" not in daemon.log.read_text()
    finally:
        assert daemon.stop() == 0


def test_two_replies_to_one_case_answer_once_when_two_workers_race(tmp_path: Path, relay: CaptureRelay) -> None:
    """Both staff members' replies are committed while the workers are stopped; a reply whose id falls in
    the other shard (one in two) is judged by the other process at the same moment. The reply's commit
    checks its target's state again under the write lock: one answer, and the other gets the notice."""
    daemon = Daemon(set_keys(write_config(tmp_path, relay.port), "service", workers=2)).start()
    try:
        forwards_by_customer: dict[str, EmailMessage] = {}
        for n in range(RACES):
            customer = f"race{n}@customer{n}.example"
            forward = open_case(daemon, relay, customer)
            forward2 = relay.to(STAFF2)[-1].message  # each staff member answers with their own reply address
            pids = list(_workers(daemon).values())
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                send(daemon.smtp_port, STAFF, [reply_address(forward)], thunderbird(forward, "First answer"))
                send(daemon.smtp_port, STAFF2, [reply_address(forward2)], thunderbird(forward2, "Second answer",
                                                                                      sender=STAFF2))
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            forwards_by_customer[customer] = forward
            case = case_id(forward)  # the next case's forward must not be taken for this one's late notice
            wait_for(lambda case=case: notices(relay, STAFF, case) + notices(relay, STAFF2, case), what="late notice")
            settled(daemon)
        wait_for(lambda: daemon.status() == IDLE, what="every case answered and purged")
        for customer, forward in forwards_by_customer.items():
            got = [new_text(a) for a in answers(relay, customer)]
            assert len(got) == 1 and got[0] in ("First answer", "Second answer"), got
            late = notices(relay, STAFF2 if got[0] == "First answer" else STAFF, case_id(forward))
            assert len(late) == 1 and "Already answered" in str(late[0]["Subject"])
        assert case_rows(StoreConfig(), daemon.data_dir) == 0
    finally:
        assert daemon.stop() == 0
