"""Reminders end to end: an open case reminds its staff at each retention.remind_after age, and
answering a reminder answers the customer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from careservice.config import ConfigError
from careservice.config import load_config
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config
from tests.test_workflow import CUSTOMER
from tests.test_workflow import answer_to
from tests.test_workflow import open_case


@pytest.fixture
def daemon(tmp_path: Path, relay: CaptureRelay) -> Iterator[Daemon]:
    proc = Daemon(write_config(tmp_path, relay.port, extra='[retention]\nremind_after = ["9s", "3s"]')).start()
    try:
        yield proc
    finally:
        proc.stop()


def reminders(relay: CaptureRelay) -> list[str]:
    return [str(c.message["Subject"]) for c in relay.to(STAFF) if "Reminder" in str(c.message["Subject"])]


def test_reminders_come_at_each_age_and_answering_one_answers_the_customer(daemon: Daemon,
                                                                           relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Lost otter", "My otter 4711 is lost"))
    wait_for(lambda: len(reminders(relay)) == 2, what="two reminders")  # the runner looks every 5 s
    [first, second] = [c for c in relay.to(STAFF) if "Reminder" in str(c.message["Subject"])]
    assert first.rcpt_tos == [STAFF] and first.mail_from == ""  # each staff member gets their own copy
    assert len([c for c in relay.to(STAFF2) if "Reminder" in str(c.message["Subject"])]) == 2
    reminder = second.message
    assert reminder["Reply-To"] == forward["Reply-To"] and "otter" not in second.raw.decode()
    assert "TicketNest" in str(reminder["Subject"]) and "second" in str(reminder["Subject"])
    send(daemon.smtp_port, STAFF, [reminder["Reply-To"].addresses[0].addr_spec],
         staff_reply(reminder, "Your otter swims home."))
    wait_for(lambda: answer_to(relay), what="answer")
    text = answer_to(relay)[0].message.get_body(("plain",)).get_content()
    assert "otter swims home" in text and "Reminder" not in text and "waited" not in text
    wait_for(lambda: daemon.status()["open_cases"] == 0 and daemon.status()["outbound_queued"] == 0, what="purge")
    assert len(reminders(relay)) == 2 and relay.to(CARE) == []
    assert files_containing(daemon.data_dir, [b"otter", CUSTOMER.encode()]) == []


def test_remind_after_is_read_and_checked(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", 1)).remind_after == (86400.0, 3 * 86400.0)
    read = load_config(write_config(tmp_path / "b", 1, extra='[retention]\nremind_after = ["2d", "30s", "4h"]'))
    assert read.remind_after == (30.0, 4 * 3600.0, 2 * 86400.0)
    for bad in ('["4 hours"]', '["0s"]', '[4]', '"4h"'):
        with pytest.raises(ConfigError, match=r"^retention\.remind_after"):
            load_config(write_config(tmp_path / "c", 1, extra=f"[retention]\nremind_after = {bad}"))
