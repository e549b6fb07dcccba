"""Stage COMMAND alone: what each "#" first line of a genuine staff reply does."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from careservice.context import Context
from careservice.crypto import Keyring
from careservice.handlers import commands
from careservice.handlers import relay_answer
from careservice.model import CaseState
from careservice.model import MailKind
from tests.stages.kit import CUSTOMER
from tests.stages.kit import command
from tests.stages.kit import forward_of
from tests.stages.kit import inputs
from tests.stages.kit import message
from tests.stages.kit import open_case
from tests.stages.kit import reply_to
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import holds


@pytest.mark.parametrize("first_line", ["#closed", "#Closed", "#phone - called her back"])
def test_a_phone_command_closes_without_mail(ctx: Context, first_line: str) -> None:
    outcome = command(ctx, open_case(ctx), f"{first_line}\nNotes.")
    assert (outcome.reason, outcome.mails, outcome.target_state) == ("closed_by_phone", (), CaseState.PURGED)


def test_a_note_goes_to_the_other_staff_under_the_case_with_its_reply_address(ctx: Context) -> None:
    case = open_case(ctx)
    outcome = command(ctx, case, "#NOTE she called\nsends the receipt tomorrow")
    assert (outcome.state, outcome.reason, outcome.target_state) == (CaseState.PURGED, "note_sent", None)
    [note] = outcome.mails
    assert (note.kind, note.case_id, note.recipients) == (MailKind.NOTE, case.id, (STAFF2,))
    mail = message(note)
    text = mail.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert "she called\nsends the receipt tomorrow" in text and STAFF in text and not holds(text, "4711")
    assert mail["Reply-To"] == ctx.addressing.reply_address(ctx.config.sites[0], case.id, case.nonce, STAFF2)
    assert f"#{case.id}]" in str(mail["Subject"]) and "Lost tickets" in str(mail["Subject"])
    assert CUSTOMER not in str(mail)


def test_an_empty_note_is_refused(ctx: Context) -> None:
    outcome = command(ctx, open_case(ctx), "#note")
    assert outcome.reason == "note_empty" and [m.recipients for m in outcome.mails] == [(STAFF,)]


@pytest.mark.parametrize("name", ["second", "Second@Staff.Example", "<second@staff.example>"])
def test_assign_forwards_the_case_to_one_and_tells_the_others(ctx: Context, name: str) -> None:
    case = open_case(ctx)
    outcome = command(ctx, case, f"#assign {name}\nShe prefers German.")
    assert (outcome.reason, outcome.target_state, outcome.counters) == ("assigned", None, ("assigned",))
    assert outcome.target_owner == STAFF2
    forward_mail, told = outcome.mails
    assert (forward_mail.kind, forward_mail.recipients, forward_mail.case_id) == (MailKind.FORWARD, (STAFF2,), case.id)
    assert b"4711" in forward_mail.message
    assert message(forward_mail)["Reply-To"] == message(forward_of(ctx, case, STAFF2))["Reply-To"]
    assert (told.kind, told.recipients) == (MailKind.NOTICE, (STAFF,))
    assert b"Assigned to second@staff.example" in told.message


@pytest.mark.parametrize("name", ["", "nobody", "staff.example"])
def test_assign_to_an_unknown_name_lists_the_staff(ctx: Context, name: str) -> None:
    outcome = command(ctx, open_case(ctx), f"#assign {name}")
    [notice] = outcome.mails
    assert outcome.reason == "assign_unknown" and notice.recipients == (STAFF,)
    assert STAFF2.encode() in notice.message and outcome.target_state is None


def test_spam_purges_the_case_and_blocks_its_sender_by_a_stable_digest(ctx: Context) -> None:
    case = open_case(ctx)
    outcome = command(ctx, case, "#Spam")
    assert (outcome.reason, outcome.mails, outcome.target_state) == ("marked_spam", (), CaseState.PURGED)
    assert outcome.counters == ("spam_marked",) and outcome.block is not None
    assert outcome.block.digests == (Keyring(b"k" * 32).block_digest(" Alice@Customer.Example"),)
    assert outcome.block.digests[0] != ctx.keyring.digest(CUSTOMER)  # not the daily digest
    assert 30 * 86400 - 60 < outcome.block.until - time.time() <= 30 * 86400


@pytest.mark.parametrize(("first_line", "reason"), [("#help", "help_sent"), ("#clossed", "reply_unknown_command"),
                                                    ("#", "reply_unknown_command")])
def test_help_and_unknown_commands_list_the_commands_to_the_sender_only(ctx: Context, first_line: str,
                                                                        reason: str) -> None:
    outcome = command(ctx, open_case(ctx), first_line)
    [notice] = outcome.mails
    assert (outcome.reason, notice.recipients, outcome.target_state) == (reason, (STAFF,), None)
    text = message(notice).get_body(("plain",)).get_content()
    assert all(f"#{name}" in text for name in ("closed", "note", "assign", "spam", "help"))


def test_a_command_for_a_case_gone_meanwhile_is_verified_again(ctx: Context) -> None:
    case = open_case(ctx)
    reply = replace(reply_to(ctx, case, "#note x"), state=CaseState.COMMAND)
    gone = commands.handle(inputs(ctx, reply, target=None), ctx)
    assert (gone.state, gone.reason) == (CaseState.STAFF_REPLY, "target_changed")


@pytest.mark.parametrize(("text", "headline"), [("Here is your refund.", "Answered"), ("#phone", "Closed")])
def test_with_notify_answered_the_other_staff_hear_of_an_answer_or_close(ctx: Context, text: str,
                                                                        headline: str) -> None:
    case = open_case(ctx)
    reply = replace(reply_to(ctx, case, text), state=CaseState.VERIFIED)
    quiet = inputs(ctx, reply, target=case)
    told = replace(quiet, site=replace(quiet.site, notify_answered=True))
    if text.startswith("#"):
        quiet, told = (replace(i, case=replace(reply, state=CaseState.COMMAND)) for i in (quiet, told))
    stage = commands.handle if text.startswith("#") else relay_answer.handle
    silent, loud = stage(quiet, ctx), stage(told, ctx)
    assert [m.kind for m in silent.mails if m.kind is MailKind.NOTICE] == []
    [notice] = [m for m in loud.mails if m.kind is MailKind.NOTICE]
    assert notice.recipients == (STAFF2,) and notice.case_id == reply.id  # not purged with the case
    subject = str(message(notice)["Subject"])
    assert f"{headline} by Agent Smith \u2014 nothing more to do" in subject and case.id in subject
    assert loud.target_state == silent.target_state and loud.target_state is not None
