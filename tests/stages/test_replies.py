"""Stages STAFF_REPLY and VERIFIED alone: which replies are genuine, and what of them reaches the customer."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from careservice.context import Context
from careservice.handlers import delivery
from careservice.handlers import relay_answer
from careservice.handlers import verify_reply
from careservice.mail import parse
from careservice.model import CaseState
from careservice.model import DeliveryFailure
from careservice.model import MailKind
from careservice.model import OutgoingMail
from careservice.model import QueuedMail
from tests.stages.kit import CUSTOMER
from tests.stages.kit import inputs
from tests.stages.kit import open_case
from tests.stages.kit import reply_to
from tests.stages.kit import with_message
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import customer_mail
from tests.support import holds


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
    reopened = replace(case, nonce=delivery.answer_failed(site, item, DeliveryFailure(550, None), ctx).nonce)
    stale = verify_reply.handle(inputs(ctx, reply, target=reopened), ctx)
    assert (stale.reason, stale.mails[0].recipients) == ("reply_token_stale", (STAFF,))


def test_relay_answer_sends_only_the_new_words_from_the_care_address(ctx: Context) -> None:
    case = open_case(ctx)
    reply = replace(reply_to(ctx, case, "Your refund is on its way."), state=CaseState.VERIFIED)
    outcome = relay_answer.handle(inputs(ctx, reply, target=case), ctx)
    assert (outcome.state, outcome.target_state) == (CaseState.PURGED, CaseState.ANSWERING)
    [answer] = outcome.mails
    assert answer.kind is MailKind.ANSWER and answer.recipients == (CUSTOMER,) and answer.sender == CARE
    assert b"refund is on its way" in answer.message and not holds(answer.message, "4711")
    assert STAFF.encode() not in answer.message
    assert (answer.route, answer.owner) == ("", "")
    routed = relay_answer.handle(inputs(ctx, reply, target=replace(case, route="refunds", owner=STAFF2)), ctx)
    assert (routed.mails[0].route, routed.mails[0].owner) == ("refunds", STAFF2)  # for the relay's event


def test_relay_answer_knows_the_customers_words_by_the_target_message_the_runner_parsed(ctx: Context) -> None:
    case = open_case(ctx)
    echo = replace(reply_to(ctx, case, "Order 4711 is lost"), state=CaseState.VERIFIED)  # only the customer's words
    loaded = inputs(ctx, echo, target=case)
    assert relay_answer.handle(loaded, ctx).reason == "reply_empty"
    unread = replace(loaded, target=with_message(case, raw=b""))  # the stage parses nothing of the target itself
    assert relay_answer.handle(unread, ctx).reason == "reply_empty"
    other = replace(loaded, target_parsed=parse(customer_mail("Lost tickets", "Something else"), CUSTOMER))
    assert relay_answer.handle(other, ctx).reason == "answer_queued"


def test_relay_answer_sends_nothing_for_an_empty_reply_or_a_gone_case(ctx: Context) -> None:
    case = open_case(ctx)
    empty = replace(reply_to(ctx, case, ""), state=CaseState.VERIFIED)
    outcome = relay_answer.handle(inputs(ctx, empty, target=case), ctx)
    assert outcome.reason == "reply_empty" and [m.kind for m in outcome.mails] == [MailKind.NOTICE]
    assert outcome.target_state is None  # the case stays open
    gone = relay_answer.handle(inputs(ctx, empty, target=None), ctx)
    assert (gone.state, gone.reason) == (CaseState.STAFF_REPLY, "target_changed")
