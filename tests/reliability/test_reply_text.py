"""What of a staff reply reaches the customer, with replies as Outlook, Gmail, Thunderbird and the
iPhone build them: only the staff member's new words, never a quote of the forward nor a line of
its instructions or contact block. An empty reply sends nothing and tells the staff member; a first
line starting with "#" is a command (closing the case) or, unknown, a notice; never customer text."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import shared_daemon
from tests.reliability.mailclients import CLIENTS
from tests.reliability.mailclients import forward_lines
from tests.reliability.mailclients import gmail
from tests.reliability.mailclients import iphone
from tests.reliability.mailclients import outlook
from tests.reliability.mailclients import thunderbird
from tests.reliability.replycase import CUSTOMER_TEXT
from tests.reliability.replycase import answers
from tests.reliability.replycase import case_id
from tests.reliability.replycase import case_state
from tests.reliability.replycase import new_text
from tests.reliability.replycase import notices
from tests.reliability.replycase import open_case
from tests.reliability.replycase import reply_to
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon

pytestmark = pytest.mark.reliability

ANSWER = "Dear Wilhelmina,\n\nyour refund for order 4711 is on its way.\n\nKind regards,\nAgent Smith"
LINKED = ('<div>Dear Wilhelmina,</div><div><br></div><div>your refund is on its way: see '
          '<a href="https://tickets.example/refund?order=4711">the refund page</a>.</div><div><br></div>'
          "<div>Kind regards,<br>Agent Smith</div>")
LINKED_TEXT = ("Dear Wilhelmina,\n\nyour refund is on its way: see the refund page "
               "<https://tickets.example/refund?order=4711>.\n\nKind regards,\nAgent Smith")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, CaptureRelay]]:
    yield from shared_daemon(tmp_path_factory, "reply-text")


def leaked(text: str, forward: EmailMessage) -> list[str]:
    """Lines of `text` that are `>`-quoted or come from the forward's own blocks (not the customer's text)."""
    own = {" ".join(line.split()) for line in forward_lines(forward) if line.strip() and CUSTOMER_TEXT not in line}
    return [line for line in text.splitlines()
            if " ".join(line.split()) in own or line.lstrip().startswith(">") or "Press Reply" in line]


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_an_empty_reply_sends_nothing_and_tells_the_staff_member(shared: tuple[Daemon, CaptureRelay],
                                                                 client: str) -> None:
    daemon, relay = shared
    customer = f"empty-{client}@customer.example"
    forward = open_case(daemon, relay, customer)
    reply_to(forward, CLIENTS[client](forward, ""), daemon)
    assert answers(relay, customer) == []
    [notice] = notices(relay, STAFF, case_id(forward))
    assert "empty" in str(notice["Subject"]) and notices(relay, STAFF2, case_id(forward)) == []
    assert case_state(daemon, case_id(forward)) == "open"


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_only_the_new_text_reaches_the_customer(shared: tuple[Daemon, CaptureRelay], client: str) -> None:
    daemon, relay = shared
    customer = f"answer-{client}@customer.example"
    forward = open_case(daemon, relay, customer)
    reply_to(forward, CLIENTS[client](forward, ANSWER), daemon)
    [answer] = answers(relay, customer)
    expected = ANSWER + ("\n\nSent from my iPhone" if client == "iphone" else "")
    assert new_text(answer) == expected, answer
    assert leaked(answer, forward) == [] and CUSTOMER_TEXT not in answer
    assert case_state(daemon, case_id(forward)) == ""


@pytest.mark.parametrize("client", ["outlook_html_only", "gmail"])
def test_an_html_answer_keeps_its_paragraphs_and_link_targets(shared: tuple[Daemon, CaptureRelay],
                                                              client: str) -> None:
    daemon, relay = shared
    customer = f"html-{client}@customer.example"
    forward = open_case(daemon, relay, customer)
    build = {"outlook_html_only": lambda: outlook(forward, "", html=LINKED, text_part=False),
             "gmail": lambda: gmail(forward, LINKED_TEXT, html=LINKED)}[client]
    reply_to(forward, build(), daemon)
    [answer] = answers(relay, customer)
    assert new_text(answer) == LINKED_TEXT, answer
    assert leaked(answer, forward) == []


COMMANDS: dict[str, Callable[[EmailMessage], bytes]] = {
    "iphone_capitalised": lambda f: iphone(f, "#Closed"),
    "free_text_after_it": lambda f: thunderbird(f, "#closed - phoned her, all sorted"),
    "phone_with_a_note_below": lambda f: gmail(f, "#phone\nCalled her at 10:30, she is happy."),
    "outlook_html_upper_case": lambda f: outlook(f, "#CLOSED", text_part=False),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_known_command_closes_the_case_and_mails_no_one(shared: tuple[Daemon, CaptureRelay], name: str) -> None:
    daemon, relay = shared
    customer = f"command-{name.replace('_', '-')}@customer.example"
    forward = open_case(daemon, relay, customer)
    reply_to(forward, COMMANDS[name](forward), daemon)
    assert answers(relay, customer) == []
    assert case_state(daemon, case_id(forward)) == ""
    assert notices(relay, STAFF, case_id(forward)) == []


def test_an_unknown_command_is_not_sent_and_the_staff_member_hears_the_commands(
        shared: tuple[Daemon, CaptureRelay]) -> None:
    daemon, relay = shared
    customer = "unknown-command@customer.example"
    forward = open_case(daemon, relay, customer)
    reply_to(forward, iphone(forward, "#Cloesd\nCalled her"), daemon)
    assert answers(relay, customer) == []
    [notice] = notices(relay, STAFF, case_id(forward))
    text = notice.get_body(("plain",)).get_content()
    assert "#closed" in text and "#phone" in text and "Cloesd" not in text and "Called her" not in text
    assert case_state(daemon, case_id(forward)) == "open"


def test_nothing_personal_in_the_log(shared: tuple[Daemon, CaptureRelay]) -> None:
    assert log_leaks(shared[0], ["@customer.example", "staff.example", "Wilhelmina", "4711", "Cloesd"]) == []
