"""Stages RECEIVED, NEW, FOLLOW_UP and ACKNOWLEDGE alone: a message in, an Outcome out; no store, no sockets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from careservice.context import Context
from careservice.handlers import acknowledge
from careservice.handlers import classify
from careservice.handlers import forward
from careservice.model import CaseState
from careservice.model import ContactDetails
from careservice.model import MailKind
from careservice.model import Source
from tests.stages.kit import CUSTOMER
from tests.stages.kit import case_of
from tests.stages.kit import inputs
from tests.stages.kit import open_case
from tests.stages.kit import reply_to
from tests.stages.kit import with_message
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import customer_mail
from tests.support import holds


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
    assert not holds(outcome.mails[0].message, "4711") and outcome.mails[0].sender == ""
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


def test_classify_discards_a_blocked_sender_without_a_case(ctx: Context) -> None:
    blocked = replace(inputs(ctx, case_of(customer_mail("Again", "buy now"))), blocked=True)
    outcome = classify.handle(blocked, ctx)
    assert (outcome.state, outcome.reason, outcome.mails, outcome.counters) == (
        CaseState.PURGED, "discard_blocked_sender", (), ("spam_discarded",))
