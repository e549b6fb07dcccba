"""Two staff replies to one case that reach the worker together: the customer gets one answer, the
other staff member the notice that the case was already answered."""

from __future__ import annotations

import os
import signal

import pytest

from tests.reliability.helpers import status
from tests.reliability.mailclients import thunderbird
from tests.reliability.replycase import answers
from tests.reliability.replycase import case_id
from tests.reliability.replycase import new_text
from tests.reliability.replycase import notices
from tests.reliability.replycase import open_case
from tests.reliability.replycase import reply_address
from tests.reliability.replycase import settled
from tests.reliability.test_kill import children
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import send
from tests.support import wait_for

pytestmark = pytest.mark.reliability


def test_two_replies_that_reach_the_worker_together_answer_once(relay: CaptureRelay, daemon: Daemon) -> None:
    customer = "together@customer.example"
    forward = open_case(daemon, relay, customer)
    forward2 = relay.to(STAFF2)[-1].message  # each staff member answers with their own reply address
    assert daemon.proc is not None
    [worker] = children(daemon.proc.pid)
    os.kill(worker, signal.SIGSTOP)  # both replies are committed before the worker sees either
    try:
        send(daemon.smtp_port, STAFF, [reply_address(forward)], thunderbird(forward, "First answer"))
        send(daemon.smtp_port, STAFF2, [reply_address(forward2)], thunderbird(forward2, "Second answer",
                                                                              sender=STAFF2))
        assert status(daemon)["inbound_pending"] == 2
    finally:
        os.kill(worker, signal.SIGCONT)
    settled(daemon)
    wait_for(lambda: status(daemon)["open_cases"] == 0, what="the case purged after its answer")
    got = [new_text(a) for a in answers(relay, customer)]
    assert len(got) == 1, got
    answer = got[0]
    assert answer in ("First answer", "Second answer")
    [late] = notices(relay, STAFF2 if answer == "First answer" else STAFF, case_id(forward))
    assert "Already answered" in str(late["Subject"])
