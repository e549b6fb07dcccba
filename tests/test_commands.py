"""Staff commands end to end over SMTP: the first line "#word" of a genuine reply acts on the case and
never reaches the customer; a forged one does nothing."""

from __future__ import annotations

import sqlite3
from email.message import EmailMessage
from pathlib import Path

import pytest

from careservice.config import ConfigError
from careservice.config import load_config
from tests.support import CARE
from tests.support import SITES
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

EMPTY = {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0}


def reply(daemon: Daemon, forward: EmailMessage, text: str, sender: str = STAFF, to: str = "") -> None:
    address = to or forward["Reply-To"].addresses[0].addr_spec
    send(daemon.smtp_port, sender, [address], staff_reply(forward, text, sender=sender, to=to))


def subjects(relay: CaptureRelay, address: str) -> list[str]:
    return [str(c.message["Subject"]) for c in relay.to(address)]


def test_a_note_reaches_the_other_staff_only_and_goes_with_the_case(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Lost wombat", "Order 4711 is lost"))
    reply(daemon, forward, "#note Called her: the kangaroo receipt follows.")
    wait_for(lambda: len(relay.to(STAFF2)) == 2, what="note")
    note = relay.to(STAFF2)[-1]
    assert note.rcpt_tos == [STAFF2] and "Lost wombat" in str(note.message["Subject"])
    assert note.message["Reply-To"] == relay.to(STAFF2)[0].message["Reply-To"]  # STAFF2's own reply address
    assert "kangaroo receipt" in note.message.get_body(("plain",)).get_content()
    assert answer_to(relay) == [] and daemon.status()["open_cases"] == 1
    reply(daemon, note.message, "Your wombat is found.", sender=STAFF2)  # answering the note answers the customer
    wait_for(lambda: answer_to(relay), what="answer")
    assert "kangaroo" not in answer_to(relay)[0].raw.decode()
    wait_for(lambda: daemon.status() == EMPTY, what="purge")
    assert files_containing(daemon.data_dir, [b"kangaroo", b"wombat"]) == []


def test_assign_forwards_to_one_and_tells_the_others(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Refund", "Order 4711"))
    reply(daemon, forward, "#Assign second")
    wait_for(lambda: len(relay.to(STAFF2)) == 2 and len(relay.to(STAFF)) == 2, what="assignment")
    again = relay.to(STAFF2)[-1]
    assert again.rcpt_tos == [STAFF2] and "Order 4711" in again.message.get_body(("plain",)).get_content()
    assert again.message["Reply-To"] == relay.to(STAFF2)[0].message["Reply-To"]  # STAFF2's own reply address
    assert subjects(relay, STAFF)[-1].endswith(f"Assigned to {STAFF2}")
    reply(daemon, forward, "#assign nobody")
    wait_for(lambda: len(relay.to(STAFF)) == 3, what="unknown staff notice")
    assert STAFF2 in relay.to(STAFF)[-1].message.get_body(("plain",)).get_content()
    assert answer_to(relay) == [] and daemon.status()["open_cases"] == 1


@pytest.mark.parametrize(("first_line", "headline"), [("#help", "Commands"), ("#clossed", "Unknown command"),
                                                      ("#notes for you", "Unknown command")])
def test_help_and_unknown_commands_answer_the_sender_only(daemon: Daemon, relay: CaptureRelay, first_line: str,
                                                          headline: str) -> None:
    forward = open_case(daemon, relay, customer_mail("Refund", "please"))
    reply(daemon, forward, first_line)
    wait_for(lambda: len(relay.to(STAFF)) == 2, what="notice")
    notice = relay.to(STAFF)[-1]
    assert notice.rcpt_tos == [STAFF] and headline in str(notice.message["Subject"])
    assert "#assign" in notice.message.get_body(("plain",)).get_content()
    assert answer_to(relay) == [] and len(relay.to(STAFF2)) == 1 and daemon.status()["open_cases"] == 1


def test_forged_commands_do_nothing(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Refund", "please"))
    good = forward["Reply-To"].addresses[0].addr_spec
    local, domain = good.split("@")
    tampered = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    reply(daemon, forward, "#closed", sender="evil@attacker.example")
    reply(daemon, forward, "#note from a stranger", sender="evil@attacker.example")
    reply(daemon, forward, "#closed", to=tampered)
    wait_for(lambda: daemon.log.read_text().count("reply_not_from_staff") == 2
             and "reply_token_invalid" in daemon.log.read_text(), what="refusals")
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="notices sent")
    assert daemon.status()["open_cases"] == 1
    assert not [c for c in relay.received if "from a stranger" in c.raw.decode()]
    assert answer_to(relay) == [] and relay.to("evil@attacker.example") == []


def test_closed_purges_the_case_and_its_notes(daemon: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(daemon, relay, customer_mail("Call me", "numbat 0123", sender=CUSTOMER))
    relay.replies.extend(["451 4.3.0 later"] * 5)  # the note stays queued under the case...
    reply(daemon, forward, "#note echidna called")
    wait_for(lambda: relay.attempts >= 1, what="note attempted")
    reply(daemon, forward, "#phone")  # ...until the close purges it with the case
    wait_for(lambda: daemon.status() == EMPTY, what="purge")
    assert answer_to(relay) == []
    assert files_containing(daemon.data_dir, [b"numbat", b"echidna"]) == []


def test_spam_purges_silently_and_discards_the_sender_later(daemon: Daemon, relay: CaptureRelay) -> None:
    spammer = "Cheap.Pills@spam.example"
    forward = open_case(daemon, relay, customer_mail("Cheap pills", "buy quetzal pills", sender=spammer),
                        sender=spammer)
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="ack")
    reply(daemon, forward, "#spam")
    wait_for(lambda: daemon.status() == EMPTY, what="purge")
    seen = len(relay.received)
    send(daemon.smtp_port, "cheap.pills@SPAM.example", [CARE],
         customer_mail("Again", "more axolotl pills", sender="cheap.pills@spam.example"))
    wait_for(lambda: "discard_blocked_sender" in daemon.log.read_text(), what="discard")
    open_case(daemon, relay, customer_mail("Real", "a real question"))  # others still get through
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="queue drained")
    assert sorted(c.rcpt_tos for c in relay.received[seen:]) == sorted([[STAFF], [STAFF2], [CUSTOMER]])
    conn = sqlite3.connect(daemon.data_dir / "cases.db")
    stats = dict(conn.execute("SELECT name, value FROM stats WHERE name LIKE 'spam_%'").fetchall())
    conn.close()
    assert stats == {"spam_marked": 1, "spam_discarded": 1}
    assert files_containing(daemon.data_dir, [b"quetzal", b"axolotl", b"pills@", b"Cheap"]) == []
    assert b"pills" not in daemon.log.read_bytes()


def test_spam_block_days_is_read_and_checked(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", 1, extra="[spam]\nblock_days = 2")).spam.block_days == 2
    with pytest.raises(ConfigError, match=r"^spam\.block_days: must be positive"):
        load_config(write_config(tmp_path / "b", 1, extra="[spam]\nblock_days = 0"))


def test_with_notify_answered_the_others_hear_of_an_answer_and_a_close(tmp_path: Path, relay: CaptureRelay) -> None:
    sites = SITES.replace(f'care_address = "{CARE}"', f'care_address = "{CARE}"\nnotify_answered = true')
    daemon = Daemon(write_config(tmp_path, relay.port, sites=sites)).start()
    try:
        answered = open_case(daemon, relay, customer_mail("Refund", "please"))
        reply(daemon, answered, "Your refund is on its way.")
        open_case(daemon, relay, customer_mail("Call me", "please", sender="bob@customer.example"),
                  sender="bob@customer.example")
        # from STAFF2's own copy of the forward, which may arrive after STAFF's copy and after the first case's
        # "answered" notice to STAFF2 (each mail goes on its own, over any of the relay connections)
        def own_copy() -> list[EmailMessage]:
            return [c.message for c in relay.to(STAFF2) if "Call me" in str(c.message["Subject"])
                    and c.message["Reply-To"] is not None]
        wait_for(own_copy, what="the forward to the second staff member")
        reply(daemon, own_copy()[0], "#closed", sender=STAFF2)
        wait_for(lambda: daemon.status() == EMPTY, what="both purged")
    finally:
        daemon.stop()
    [to_second] = [s for s in subjects(relay, STAFF2) if "nothing more to do" in s]
    [to_first] = [s for s in subjects(relay, STAFF) if "nothing more to do" in s]
    assert to_second.endswith("Answered by Agent Smith \u2014 nothing more to do")
    assert to_first.endswith("Closed by Agent Smith \u2014 nothing more to do")
    assert len(answer_to(relay)) == 1
