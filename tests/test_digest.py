"""The daily digest: cases opened over SMTP against the real daemon, then the worker's digest job run with an
injected clock (the worker's own code, in this process, towards the capture relay), then an answer through
a digest's reply address over SMTP again."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from careservice.config import load_config
from careservice.worker import CaseWorker
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import Captured
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import wait_for
from tests.support import with_routes
from tests.support import write_config
from tests.test_commands import reply
from tests.test_workflow import CUSTOMER
from tests.test_workflow import answer_to
from tests.test_workflow import open_case

REFUNDS = "refunds@staff.example"
SITES = with_routes(f'[[sites.routes]]\nmatch_subject = "(?i)refund"\nstaff = ["{REFUNDS}"]\n')
DAY = 86400.0


def digests(relay: CaptureRelay) -> list[Captured]:
    return [c for c in relay.received if "open case" in str(c.message["Subject"])]


async def run_digest(config: Path, clock: Callable[[], float]) -> int:
    """The worker's digest job once at `clock`'s time, then its outbox: the mails handed to the relay."""
    worker = CaseWorker(load_config(config), clock=clock)
    await worker.store.start(sweep=False)
    try:
        await worker.send_digests()
        return await worker.outbox.deliver_due()
    finally:
        await worker.outbox.relay.close_idle(0)
        await worker.store.close()


def staff_mail(to: str, text: str, sender: str) -> bytes:
    """A new mail (not a reply) from a staff member to a case's reply address, as the digest suggests."""
    return (f"From: Second <{sender}>\r\nTo: {to}\r\nSubject: your refund\r\n"
            f"Message-ID: <{time.time_ns()}@staff.example>\r\n\r\n{text}\r\n").encode()


async def test_the_digest_goes_at_its_time_once_a_day_and_answers_through_its_addresses(
        tmp_path: Path, relay: CaptureRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")  # "at" is local time: for this process and the daemon it starts
    time.tzset()
    config = write_config(tmp_path, relay.port, sites=SITES,
                          extra='[digest]\nat = "08:00"\n[retention]\nremind_after = ["20d"]')
    daemon = Daemon(config).start()
    try:
        lost = open_case(daemon, relay, customer_mail("Lost wombat tickets", "order 4711, wombat"))
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Refund numbat", "numbat seats", sender=CUSTOMER))
        wait_for(lambda: relay.to(REFUNDS), what="the routed forward")
        refund = relay.to(REFUNDS)[0].message
        reply(daemon, lost, "#assign second")  # the older case gets an owner
        wait_for(lambda: daemon.status()["outbound_queued"] == 0 and len(relay.to(STAFF2)) == 2, what="assignment")
    finally:
        daemon.stop()
    ids = [re.search(r"#([0-9a-f]{12})\]", str(m["Subject"])).group(1) for m in (lost, refund)]  # type: ignore[union-attr]
    tomorrow = (time.time() // DAY + 1) * DAY  # midnight UTC
    before = len(relay.received)

    assert await run_digest(config, lambda: tomorrow + 8 * 3600 - 60) == 0  # 07:59: not yet
    # 08:00: one per staff member with cases to list; none for ixs, which has no open case
    assert await run_digest(config, lambda: tomorrow + 8 * 3600) == 3
    assert await run_digest(config, lambda: tomorrow + 8.5 * 3600) == 0  # once a day, also after a restart
    assert await run_digest(config, lambda: tomorrow + DAY + 9 * 3600) == 3  # the next day, caught up at 09:00
    assert len(relay.received) == before + 6

    first = {c.rcpt_tos[0]: c for c in digests(relay)[:3]}
    assert sorted(first) == sorted([STAFF, STAFF2, REFUNDS])
    for address, mail in first.items():
        text = mail.message.get_body(("plain",)).get_content()
        listed = re.findall(r"Case ([0-9a-f]{12}): waiting (.+), owner (\S+)", text)
        addresses = re.findall(r"answer it: (\S+)", text)
        if address == REFUNDS:  # a route's staff see their route's cases; the site's staff see them all
            assert [case for case, _, _ in listed] == [ids[1]]
        else:
            assert [(case, owner) for case, _, owner in listed] == [(ids[0], STAFF2), (ids[1], "nobody")]
            assert listed[0][1].split()[1].rstrip("s") in ("day", "hour")  # hours or days old by then
        assert len(set(addresses)) == len(listed) and all(a.startswith("care+") for a in addresses)
        assert "2 open cases" in str(mail.message["Subject"]) or address == REFUNDS
        for secret in (b"wombat", b"numbat", b"Lost", b"4711", CUSTOMER.encode()):  # no customer text at all
            assert secret not in mail.raw
    conn = sqlite3.connect(tmp_path / "data" / "keys.db")
    assert conn.execute("SELECT count(*) FROM keys").fetchone()[0] == 2  # the digests' own keys went with them
    conn.close()

    # answering through a digest's address answers the case and purges it
    text = first[STAFF2].message.get_body(("plain",)).get_content()
    refund_address = re.findall(r"answer it: (\S+)", text)[1]
    daemon = Daemon(config).start()
    try:
        send(daemon.smtp_port, STAFF2, [refund_address], staff_mail(refund_address, "The numbat refund is sent.",
                                                                    STAFF2))
        wait_for(lambda: any(b"numbat refund is sent" in c.raw for c in answer_to(relay)), what="answer")
        wait_for(lambda: daemon.status()["open_cases"] == 1, what="the answered case purged")
    finally:
        daemon.stop()
    assert files_containing(tmp_path / "data", [b"numbat"]) == []
