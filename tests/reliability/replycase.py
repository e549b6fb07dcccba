"""One case, from the customer's mail to what staff and customer got back: the pieces the reply tests share."""

from __future__ import annotations

import re
import sqlite3
from email.message import EmailMessage

from tests.reliability.helpers import status
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import wait_for

CUSTOMER_TEXT = "Order 4711 never arrived, please help."


def open_case(daemon: Daemon, relay: CaptureRelay, customer: str) -> EmailMessage:
    """Send a customer mail and wait until it is forwarded and acknowledged; the forward staff got."""
    before = len(relay.to(STAFF))
    send(daemon.smtp_port, customer, [CARE], customer_mail("Lost order", CUSTOMER_TEXT, sender=customer,
                                                            name="Wilhelmina Markername"))
    wait_for(lambda: len(relay.to(STAFF)) > before, what="forward")
    settled(daemon)
    return relay.to(STAFF)[-1].message


def settled(daemon: Daemon) -> None:
    wait_for(lambda: status(daemon)["inbound_pending"] == 0 and status(daemon)["outbound_queued"] == 0,
             what="all processed")


def reply_address(forward: EmailMessage) -> str:
    return forward["Reply-To"].addresses[0].addr_spec


def reply_to(forward: EmailMessage, raw: bytes, daemon: Daemon, sender: str = STAFF) -> None:
    """Send `raw` to the forward's reply address and wait until everything it causes is sent."""
    send(daemon.smtp_port, sender, [reply_address(forward)], raw)
    settled(daemon)


def case_id(forward: EmailMessage) -> str:
    found = re.search(r"#([0-9a-f]{12})\]", str(forward["Subject"]))
    assert found, forward["Subject"]
    return found.group(1)


def case_state(daemon: Daemon, case: str) -> str:
    """The case's state in the store, "" once it is gone."""
    conn = sqlite3.connect(f"file:{daemon.data_dir / 'cases.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT state FROM cases WHERE id=?", (case,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else ""


def answers(relay: CaptureRelay, customer: str) -> list[str]:
    """The text of every answer the customer got (acknowledgements are automatic, answers not)."""
    return [c.message.get_body(("plain",)).get_content().replace("\r\n", "\n") for c in relay.to(customer)
            if "Auto-Submitted" not in c.message]


def new_text(answer: str) -> str:
    """The staff member's part of an answer (mail/<language>/answer.txt adds the signature after "-- ")."""
    return answer.split("\n-- \n")[0].strip()


def notices(relay: CaptureRelay, staff: str, case: str) -> list[EmailMessage]:
    """The automatic notices `staff` got about `case`."""
    return [c.message for c in relay.to(staff) if f"#{case}]" in str(c.message["Subject"])
            and c.message["Auto-Submitted"] == "auto-replied"]
