"""The hard age limit: a case that expiry cannot reach (its site removed from the config), one whose
answer the relay never takes, and mail still queued for a case already gone are purged at
retention.hard_limit_days with their keys, and the operator is told."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import status
from tests.reliability.helpers import stored_rows
from tests.support import CARE
from tests.support import SITES
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

AGE_DAYS = 33  # past the default limit: unanswered_days 30 + 2
KEPT_SITE = "[[sites]]" + SITES.split("[[sites]]")[1]  # ticketnest; the test removes ixs


def test_cases_past_the_hard_limit_are_purged_whatever_their_state_or_site(tmp_path: Path) -> None:
    relay = CaptureRelay().start()
    daemon = Daemon(write_config(tmp_path, relay.port, retry_delays="[1]")).start()
    try:
        send(daemon.smtp_port, "kept@customer.example", [CARE], customer_mail("kept site", "hello-kept-mark",
                                                                              sender="kept@customer.example"))
        # all three mails (a forward to each staff member and the ack) before the relay takes nothing: each may
        # come in a relay session of its own
        wait_for(lambda: relay.to(STAFF) and status(daemon)["outbound_queued"] == 0, what="the kept case's mail sent")
        forward = relay.to(STAFF)[0].message
        relay.replies = ["451 4.3.0 try later"] * 10_000  # from now on the relay takes nothing
        send(daemon.smtp_port, STAFF, [str(forward["Reply-To"])], staff_reply(forward, "answer-never-taken-mark"))
        wait_for(lambda: status(daemon)["inbound_pending"] == 0 and status(daemon)["outbound_queued"] == 1,
                 what="the answer queued")
        # a second answer finds the case answering: its "already answered" notice is keyed to the reply,
        # which is dropped at once, so the notice is queued mail of a case that is gone
        send(daemon.smtp_port, STAFF, [str(forward["Reply-To"])], staff_reply(forward, "second-answer-mark"))
        send(daemon.smtp_port, "gone@customer.example", ["care@ixs.test"],
             customer_mail("removed site", "hello-removed-mark", sender="gone@customer.example"))
        wait_for(lambda: status(daemon)["inbound_pending"] == 0 and status(daemon)["outbound_queued"] == 4,
                 what="the notice and the removed site's forward and ack queued")
    finally:
        daemon.stop()
    write_config(tmp_path, relay.port, retry_delays="[1]", sites=KEPT_SITE)  # the same file, without ixs
    cases = sqlite3.connect(daemon.data_dir / "cases.db")
    with cases:
        cases.execute("UPDATE cases SET created = created - ?", (AGE_DAYS * 86400,))
        cases.execute("UPDATE outbox SET created = created - ?", (AGE_DAYS * 86400,))
        aged = dict(cases.execute("SELECT id, state FROM cases UNION SELECT case_id, 'purged' FROM outbox "
                                  "WHERE case_id NOT IN (SELECT id FROM cases)").fetchall())
    cases.close()
    assert sorted(aged.values()) == ["answering", "open", "purged"]
    keys = sqlite3.connect(daemon.data_dir / "keys.db")
    wrapped = [row[0] for row in keys.execute("SELECT wrapped FROM keys")]
    keys.close()
    assert len(wrapped) == 3

    daemon.start()
    try:
        wait_for(lambda: len(re.findall(r"case_purged_hard_limit", daemon.log.read_text())) == 3,
                 what="both cases and the notice purged at the hard limit")
        rows = stored_rows(daemon.data_dir)
        # the keys are gone from every file, WAL included (the sweep truncates it as every purge does),
        # so what may remain of a case's sealed bytes can never be opened again
        left = files_containing(daemon.data_dir, wrapped)
    finally:
        daemon.stop()
        relay.stop()
    log = daemon.log.read_text()
    for case_id, state in aged.items():
        assert f"case_purged_hard_limit case={case_id} state={state} age_days={AGE_DAYS}" in log
    assert rows == {"cases": 0, "outbox": 0, "k.keys": 0} and left == []
    stats = sqlite3.connect(daemon.data_dir / "cases.db")
    counted = stats.execute("SELECT site, value FROM stats WHERE name='purged_hard_limit'").fetchall()
    stats.close()
    assert counted == [("ticketnest", 2)]  # the answering case and the notice; the removed site has no statistics
    assert log_leaks(daemon, ["@customer.example", "hello-kept-mark", "hello-removed-mark", "never-taken-mark",
                              "second-answer-mark"]) == []
    print(f"hard limit: purged {dict(sorted(aged.items(), key=lambda kv: kv[1]))} at {AGE_DAYS} days, rows {rows}")
