"""Each stage alone, as the pure function it is: inputs in, an Outcome out; no store, no sockets."""

from __future__ import annotations

import pkgutil
import time
from dataclasses import replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

import careservice.handlers as handlers
from careservice.addresses import Addressing
from careservice.config import load_config
from careservice.context import Context, Inputs
from careservice.crypto import Keyring
from careservice.handlers import (
    DIGEST,
    EVENTS,
    STAGES,
    acknowledge,
    classify,
    commands,
    delivery,
    expire,
    forward,
    relay_answer,
    verify_reply,
)
from careservice.mail import parse
from careservice.model import (
    Case,
    CaseState,
    ContactDetails,
    Envelope,
    Inbound,
    MailKind,
    Outcome,
    OutgoingMail,
    QueuedMail,
    Source,
)
from careservice.texts import Texts
from tests.support import CARE, STAFF, STAFF2, customer_mail, staff_reply, write_config

WAITING = {CaseState.ANSWERING, CaseState.PURGED}  # moved on by the outbox, or gone
CUSTOMER = "alice@customer.example"


def test_every_state_has_a_stage_and_every_stage_module_is_wired() -> None:
    assert set(STAGES) == set(CaseState) - WAITING
    wired = {fn.__module__.rsplit(".", 1)[1] for fn in (*STAGES.values(), *EVENTS.values(), DIGEST)}
    assert wired == {m.name for m in pkgutil.iter_modules(handlers.__path__)}


def test_stages_import_no_io() -> None:
    for module in pkgutil.iter_modules(handlers.__path__):
        source = Path(handlers.__path__[0], module.name + ".py").read_text()
        for forbidden in ("careservice.store", "sqlite3", "aiosmtplib", "careservice.intake", "careservice.outbox",
                          "socket", "asyncio"):
            assert f"import {forbidden}" not in source and f"from {forbidden} " not in source, (module, forbidden)


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    config = load_config(write_config(tmp_path, relay_port=1))
    keyring = Keyring(b"k" * 32)
    return Context(config, Addressing(config.sites, keyring), keyring, Texts(config.templates_dir), time.time)


def case_of(raw: bytes, state: CaseState = CaseState.RECEIVED, sender: str = CUSTOMER, rcpt: str = CARE,
            **fields: object) -> Case:
    message = Inbound(Source.SMTP, Envelope(sender, rcpt), raw)
    case = Case("c0ffee000001", "ticketnest", state, time.time(), "0a1b2c3d", message)
    return replace(case, **fields)  # type: ignore[arg-type]


def with_message(case: Case, **fields: object) -> Case:
    """`case` carrying its message with `fields` changed (its envelope or bytes)."""
    return replace(case, message=replace(case.message, **fields))  # type: ignore[arg-type]


def inputs(ctx: Context, case: Case, target: Case | None = None, dkim_domains: tuple[str, ...] = (),
           staff_auth: str = "none") -> Inputs:
    site = ctx.config.site(case.site)
    assert site is not None
    parsed = parse(case.message.raw, case.message.envelope.mail_from)
    return Inputs(case, replace(site, staff_auth=staff_auth), parsed, target, time.time(), dkim_domains)


def open_case(ctx: Context) -> Case:
    """A case as it waits for staff: classified, with its contact details."""
    raw = customer_mail("Lost tickets", "Order 4711 is lost")
    outcome = classify.handle(inputs(ctx, case_of(raw)), ctx)
    assert outcome.updates is not None
    return replace(outcome.updates, state=CaseState.OPEN)


def forward_of(ctx: Context, case: Case, staff: str = STAFF) -> OutgoingMail:
    mails = forward.new_case(inputs(ctx, replace(case, state=CaseState.NEW)), ctx).mails
    return next(m for m in mails if m.recipients == (staff,))


def reply_to(ctx: Context, case: Case, text: str, sender: str = STAFF, forwarded_to: str = "",
             headers: bytes = b"") -> Case:
    """The staff reply (from `sender`, to the forward `forwarded_to` got, default the sender's or the
    first staff address's), classified: state STAFF_REPLY with its target set; `headers` go on top."""
    from email import message_from_bytes, policy

    staff = forwarded_to or (sender if sender in (STAFF, STAFF2) else STAFF)
    forward_mail = message_from_bytes(forward_of(ctx, case, staff).message, policy=policy.default)
    raw = headers + staff_reply(forward_mail, text, sender=sender)  # type: ignore[arg-type]
    rcpt = forward_mail["Reply-To"].addresses[0].addr_spec
    outcome = classify.handle(inputs(ctx, case_of(raw, sender=sender, rcpt=rcpt)), ctx)
    assert outcome.state is CaseState.STAFF_REPLY and outcome.updates is not None
    return outcome.updates


def test_classify_opens_a_new_case_with_the_contact(ctx: Context) -> None:
    outcome = classify.handle(inputs(ctx, case_of(customer_mail("Hello", "text"))), ctx)
    assert outcome.state is CaseState.NEW and outcome.updates is not None
    assert outcome.updates.contact == ContactDetails("Alice Example", CUSTOMER)
    assert outcome.updates.subject == "Hello"


def test_classify_discards_bounces_and_our_own_mail(ctx: Context) -> None:
    bounce = classify.handle(inputs(ctx, case_of(customer_mail("Undeliverable", "x"), sender="")), ctx)
    assert (bounce.state, bounce.reason) == (CaseState.PURGED, "discard_null_sender")
    ours = classify.handle(inputs(ctx, case_of(customer_mail("Loop", "x", sender=CARE), sender=CARE)), ctx)
    assert (ours.state, ours.reason) == (CaseState.PURGED, "discard_from_ourselves")


def test_classify_knows_a_staff_reply_and_a_follow_up(ctx: Context) -> None:
    case = open_case(ctx)
    reply = reply_to(ctx, case, "Here you go.")
    assert reply.target == case.id
    ack_id = ctx.addressing.ack_message_id(ctx.config.sites[0], case.id, case.nonce)
    follow = customer_mail("Re: Lost tickets", "more", headers={"References": f"<{ack_id}>"})
    outcome = classify.handle(inputs(ctx, case_of(follow)), ctx)
    assert outcome.state is CaseState.FOLLOW_UP and outcome.updates is not None and outcome.updates.target == case.id


def test_forward_goes_to_every_staff_address_with_the_case_reply_address(ctx: Context) -> None:
    case = open_case(ctx)
    outcome = forward.new_case(inputs(ctx, replace(case, state=CaseState.NEW)), ctx)
    assert (outcome.state, outcome.counters) == (CaseState.ACKNOWLEDGE, ("opened",))
    assert [m.recipients for m in outcome.mails] == [(STAFF,), (STAFF2,)]
    site = ctx.config.sites[0]
    for mail in outcome.mails:
        assert mail.kind is MailKind.FORWARD and mail.case_id == case.id
        own = ctx.addressing.reply_address(site, case.id, case.nonce, mail.recipients[0])
        assert f"Reply-To: {own}\r\n".encode() in mail.message  # each staff member's own token


def test_a_follow_up_joins_its_open_case_or_becomes_new(ctx: Context) -> None:
    case = open_case(ctx)
    follow = replace(case_of(customer_mail("Re", "and another thing"), state=CaseState.FOLLOW_UP), target=case.id)
    joined = forward.follow_up(inputs(ctx, follow, target=case), ctx)
    assert joined.state is CaseState.PURGED and joined.mails[0].case_id == case.id
    gone = forward.follow_up(inputs(ctx, follow, target=None), ctx)
    assert (gone.state, gone.reason, gone.mails) == (CaseState.NEW, "follow_up_case_gone", ())


def test_acknowledge_declares_its_rate_slot_and_never_echoes_the_query(ctx: Context) -> None:
    case = replace(open_case(ctx), state=CaseState.ACKNOWLEDGE)
    outcome = acknowledge.handle(inputs(ctx, case), ctx)
    assert outcome.state is CaseState.OPEN and [m.kind for m in outcome.mails] == [MailKind.ACK]
    assert outcome.ack_slot is not None
    assert [limit for _, limit in outcome.ack_slot.limits] == [ctx.config.acks_per_hour,
                                                                ctx.config.acks_per_domain_per_hour,
                                                                ctx.config.acks_per_hour_total]
    assert b"4711" not in outcome.mails[0].message and outcome.mails[0].sender == ""
    nobody = acknowledge.handle(inputs(ctx, replace(case, contact=None)), ctx)
    assert (nobody.reason, nobody.mails, nobody.ack_slot) == ("no_ack_address", (), None)


def test_acknowledge_only_a_sender_that_holds_up(ctx: Context) -> None:
    """12 spoofed mails gave 12 acks to victim+0..11@victim.example: the From was never checked."""
    case = replace(open_case(ctx), state=CaseState.ACKNOWLEDGE)
    forged = with_message(case, envelope=replace(case.message.envelope, mail_from="bulk@spammer.example"))
    assert acknowledge.handle(inputs(ctx, forged), ctx).reason == "no_ack_sender_unverified"
    spf_pass = with_message(forged, raw=b"X-Careservice-Spam: ham; spf=pass; dmarc=none\r\n" + forged.message.raw)
    assert acknowledge.handle(inputs(ctx, spf_pass), ctx).reason == "acknowledged"
    both_fail = with_message(case, raw=b"X-Careservice-Spam: ham; spf=fail; dmarc=fail\r\n" + case.message.raw)
    assert acknowledge.handle(inputs(ctx, both_fail), ctx).reason == "no_ack_sender_failed"


def test_acknowledge_limits_key_the_address_without_its_tag_and_count_its_domain(ctx: Context) -> None:
    tagged = acknowledge.rate_limits("Victim+3@Victim.example", ctx)
    plain = acknowledge.rate_limits("victim@victim.example", ctx)
    other = acknowledge.rate_limits("someone@victim.example", ctx)
    assert tagged == plain and tagged[0] != other[0] and tagged[1:] == other[1:]


def test_verify_reply_refuses_strangers_bad_tokens_and_late_replies(ctx: Context) -> None:
    case = open_case(ctx)
    reply = reply_to(ctx, case, "Answer")
    assert verify_reply.handle(inputs(ctx, reply, target=case), ctx).state is CaseState.VERIFIED
    late = verify_reply.handle(inputs(ctx, reply, target=replace(case, state=CaseState.ANSWERING)), ctx)
    assert late.reason == "reply_late" and late.mails[0].recipients == (STAFF,)
    stranger = reply_to(ctx, case, "Answer", sender="intruder@elsewhere.example")
    refused = verify_reply.handle(inputs(ctx, stranger, target=case), ctx)
    assert refused.reason == "reply_not_from_staff" and refused.mails[0].recipients == (STAFF, STAFF2)
    assert b"intruder" not in refused.mails[0].message
    invalid = verify_reply.handle(inputs(ctx, replace(reply, target="")), ctx)
    assert invalid.reason == "reply_token_invalid" and invalid.counters == ("reply_refused",)


@pytest.mark.parametrize("source", [Source.SMTP, Source.IMAP])
def test_classify_takes_a_token_only_from_the_envelope(ctx: Context, source: Source) -> None:
    case = open_case(ctx)
    address = reply_to(ctx, case, "x").message.envelope.rcpt
    copied = customer_mail("Re: Lost tickets", "hi", sender=STAFF, headers={"Cc": address, "Delivered-To": address,
                                                                            "X-Original-To": address})
    outcome = classify.handle(inputs(ctx, with_message(case_of(copied, sender=STAFF), source=source)), ctx)
    assert outcome.state is CaseState.NEW  # to the care address: a new case, as from anyone
    enveloped = classify.handle(inputs(ctx, with_message(case_of(copied, sender=STAFF, rcpt=address),
                                                         source=source)), ctx)
    assert enveloped.state is CaseState.STAFF_REPLY and enveloped.updates is not None
    assert enveloped.updates.target == case.id


def test_verify_reply_takes_a_token_only_from_the_staff_member_it_was_issued_to(ctx: Context) -> None:
    case = open_case(ctx)
    borrowed = reply_to(ctx, case, "Answer", sender=STAFF2, forwarded_to=STAFF)
    refused = verify_reply.handle(inputs(ctx, borrowed, target=case), ctx)
    assert (refused.state, refused.reason, refused.counters) == (CaseState.PURGED, "reply_other_staff",
                                                                ("reply_refused",))
    assert refused.mails[0].recipients == (STAFF2,)
    own = reply_to(ctx, case, "Answer", sender=STAFF2)
    assert verify_reply.handle(inputs(ctx, own, target=case), ctx).state is CaseState.VERIFIED


def test_verify_reply_in_dkim_mode_needs_an_aligned_signature(ctx: Context) -> None:
    case = open_case(ctx)
    reply = reply_to(ctx, case, "Answer")
    for signers in [("staff.example",), ("elsewhere.example", "STAFF.example")]:
        ok = verify_reply.handle(inputs(ctx, reply, target=case, dkim_domains=signers, staff_auth="dkim"), ctx)
        assert ok.state is CaseState.VERIFIED, signers
    for signers in [(), ("elsewhere.example",), ("mail.staff.example",), ("example",), ("evilstaff.example",)]:
        refused = verify_reply.handle(inputs(ctx, reply, target=case, dkim_domains=signers, staff_auth="dkim"), ctx)
        assert (refused.reason, refused.counters) == ("reply_unauthenticated", ("reply_refused",)), signers
        assert refused.mails[0].recipients == (STAFF,) and refused.mails[0].kind is MailKind.NOTICE
    plain = verify_reply.handle(inputs(ctx, reply, target=case), ctx)
    assert plain.state is CaseState.VERIFIED  # "none": the token and the staff From, as before


TRUSTED = (b"Authentication-Results: mx.care.test; spf=pass smtp.mailfrom=staff.example;\r\n"
           b" dkim=pass header.d=staff.example\r\n")
TRUSTED_FAIL = (b"Authentication-Results: mx.care.test; dkim=fail header.d=staff.example;\r\n"
                b" dmarc=fail header.from=staff.example\r\n")


@pytest.mark.parametrize(("headers", "passes"), [
    (TRUSTED, True),
    (b"Authentication-Results: MX.care.test (our MX); dmarc=pass (p=reject) header.from=staff.example\r\n", True),
    (b"Authentication-Results: mx.care.test; dkim=pass header.d=elsewhere.example\r\n", False),
    (TRUSTED_FAIL + TRUSTED, False),  # a forged header below the trusted one is ignored
    (b"Authentication-Results: mx.evil.example; dkim=pass header.d=staff.example\r\n" + TRUSTED, False),
    (b'Authentication-Results: mx.care.test; dkim=fail reason="x; dkim=pass header.d=staff.example"\r\n', False),
    (b"", False),
])
def test_verify_reply_in_authres_mode_reads_only_the_topmost_header(ctx: Context, headers: bytes,
                                                                     passes: bool) -> None:
    case = open_case(ctx)
    reply = reply_to(ctx, case, "Answer", headers=headers)
    outcome = verify_reply.handle(inputs(ctx, reply, target=case, staff_auth="authres:mx.care.test"), ctx)
    assert outcome.reason == ("reply_verified" if passes else "reply_unauthenticated")


def test_verify_reply_refuses_a_token_of_before_the_case_reopened(ctx: Context) -> None:
    case = open_case(ctx)
    reply = reply_to(ctx, case, "Answer")
    site = ctx.config.sites[0]
    answer = OutgoingMail(MailKind.ANSWER, case.id, CARE, (CUSTOMER,), b"x", "m@x")
    item = QueuedMail(7, site.id, 3, time.time(), answer)
    reopened = replace(case, nonce=delivery.answer_failed(site, item, "550", ctx).nonce)
    stale = verify_reply.handle(inputs(ctx, reply, target=reopened), ctx)
    assert (stale.reason, stale.mails[0].recipients) == ("reply_token_stale", (STAFF,))


def test_relay_answer_sends_only_the_new_words_from_the_care_address(ctx: Context) -> None:
    case = open_case(ctx)
    reply = replace(reply_to(ctx, case, "Your refund is on its way."), state=CaseState.VERIFIED)
    outcome = relay_answer.handle(inputs(ctx, reply, target=case), ctx)
    assert (outcome.state, outcome.target_state) == (CaseState.PURGED, CaseState.ANSWERING)
    [answer] = outcome.mails
    assert answer.kind is MailKind.ANSWER and answer.recipients == (CUSTOMER,) and answer.sender == CARE
    assert b"refund is on its way" in answer.message and b"4711" not in answer.message
    assert STAFF.encode() not in answer.message


def command(ctx: Context, case: Case, text: str, sender: str = STAFF) -> Outcome:
    """What a verified staff reply starting with `text` does: relay_answer hands it to stage COMMAND."""
    reply = replace(reply_to(ctx, case, text, sender=sender), state=CaseState.VERIFIED)
    relayed = relay_answer.handle(inputs(ctx, reply, target=case), ctx)
    assert (relayed.state, relayed.mails, relayed.target_state) == (CaseState.COMMAND, (), None)
    return commands.handle(inputs(ctx, replace(reply, state=CaseState.COMMAND), target=case), ctx)


def message(mail: OutgoingMail) -> EmailMessage:
    return message_from_bytes(mail.message, policy=policy.default)  # type: ignore[return-value]


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
    assert "she called\nsends the receipt tomorrow" in text and STAFF in text and "4711" not in text
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


def test_classify_discards_a_blocked_sender_without_a_case(ctx: Context) -> None:
    blocked = replace(inputs(ctx, case_of(customer_mail("Again", "buy now"))), blocked=True)
    outcome = classify.handle(blocked, ctx)
    assert (outcome.state, outcome.reason, outcome.mails, outcome.counters) == (
        CaseState.PURGED, "discard_blocked_sender", (), ("spam_discarded",))


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


def test_relay_answer_sends_nothing_for_an_empty_reply_or_a_gone_case(ctx: Context) -> None:
    case = open_case(ctx)
    empty = replace(reply_to(ctx, case, ""), state=CaseState.VERIFIED)
    outcome = relay_answer.handle(inputs(ctx, empty, target=case), ctx)
    assert outcome.reason == "reply_empty" and [m.kind for m in outcome.mails] == [MailKind.NOTICE]
    assert outcome.target_state is None  # the case stays open
    gone = relay_answer.handle(inputs(ctx, empty, target=None), ctx)
    assert (gone.state, gone.reason) == (CaseState.STAFF_REPLY, "target_changed")


def test_an_open_case_is_reminded_at_each_age_to_its_owner_or_its_staff(ctx: Context) -> None:
    case = replace(open_case(ctx), created=time.time() - 25 * 3600)
    outcome = expire.handle(inputs(ctx, case), ctx)
    assert (outcome.state, outcome.reason, outcome.counters) == (CaseState.OPEN, "reminded", ("reminders",))
    assert outcome.updates is not None and outcome.updates.reminded == 1
    assert [(m.case_id, m.recipients) for m in outcome.mails] == [(case.id, (STAFF,)), (case.id, (STAFF2,))]
    reminder = outcome.mails[1]
    mail = message(reminder)
    assert mail["Reply-To"] == ctx.addressing.reply_address(ctx.config.sites[0], case.id, case.nonce, STAFF2)
    assert f"#{case.id}]" in str(mail["Subject"]) and "1 day 1 hour" in str(mail["Subject"])
    assert b"4711" not in reminder.message and b"Lost tickets" not in reminder.message
    assert CUSTOMER.encode() not in reminder.message and b"TicketNest" in reminder.message
    owned = expire.handle(inputs(ctx, replace(case, owner=STAFF2)), ctx)
    assert owned.mails[0].recipients == (STAFF2,)
    both = expire.handle(inputs(ctx, replace(case, created=time.time() - 80 * 3600)), ctx)  # one, not a burst
    assert len(both.mails) == 2 and both.updates is not None and both.updates.reminded == 2  # one each
    for early in (replace(case, reminded=1), replace(case, created=time.time()), replace(case, reminded=2)):
        assert expire.handle(inputs(ctx, early), ctx).reason == "not_due"


def test_expire_purges_and_tells_staff(ctx: Context) -> None:
    outcome = expire.handle(inputs(ctx, replace(open_case(ctx), created=time.time() - 30 * 86400)), ctx)
    assert (outcome.state, outcome.counters) == (CaseState.PURGED, ("expired",))
    assert outcome.mails[0].recipients == (STAFF, STAFF2) and outcome.mails[0].kind is MailKind.NOTICE


def test_delivery_events_purge_or_reopen_with_a_notice(ctx: Context) -> None:
    site = ctx.config.sites[0]
    item = QueuedMail(1, site.id, 3, time.time(), OutgoingMail(MailKind.ANSWER, "c0ffee000001", CARE, (CUSTOMER,),
                                                                b"x", "m@x"))
    delivered = delivery.answer_delivered(site, item, "", ctx)
    assert (delivered.state, delivered.counters, delivered.mails) == (CaseState.PURGED, ("answered",), ())
    failed = delivery.answer_failed(site, item, "the relay refused it permanently (code 550)", ctx)
    assert failed.state is CaseState.OPEN and [m.recipients for m in failed.mails] == [(STAFF,), (STAFF2,)]
    assert b"code 550" in failed.mails[0].message and CUSTOMER.encode() not in failed.mails[0].message
    assert len(failed.nonce) == 8 and failed.nonce != "0a1b2c3d"  # old reply addresses stop verifying
    again = delivery.answer_failed(site, replace(item, id=2), "550", ctx)
    assert again.nonce != failed.nonce  # each failed answer issues new ones
    for staff, notice in zip((STAFF, STAFF2), failed.mails, strict=True):
        reply_address = ctx.addressing.reply_address(site, "c0ffee000001", failed.nonce, staff)
        assert f"Reply-To: {reply_address}".encode() in notice.message
