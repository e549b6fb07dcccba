"""What happens to an open case later, alone: reminders, expiry, the relay's events, the digest, the notices' words."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import time as clock_time
from email import message_from_bytes
from email import policy

import pytest

from careservice.context import Context
from careservice.context import Inputs
from careservice.handlers import DIGEST
from careservice.handlers import delivery
from careservice.handlers import digest
from careservice.handlers import expire
from careservice.handlers import relay_answer
from careservice.handlers import verify_reply
from careservice.model import CaseState
from careservice.model import DeliveryFailure
from careservice.model import MailKind
from careservice.model import OpenCase
from careservice.model import OutgoingMail
from careservice.model import QueuedMail
from careservice.settings import Route
from careservice.texts import NOTICE_FOLDER
from careservice.texts import NOTICES
from careservice.texts import Texts
from tests.stages.kit import CUSTOMER
from tests.stages.kit import command
from tests.stages.kit import inputs
from tests.stages.kit import message
from tests.stages.kit import open_case
from tests.stages.kit import reply_to
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import holds

REFUSED = DeliveryFailure(550, None)
# refused for good; given up after temporary refusals; given up on a relay not reached
FAILURES = (REFUSED, DeliveryFailure(451, 432000), DeliveryFailure(None, 600))


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
    assert not holds(reminder.message, "4711") and b"Lost tickets" not in reminder.message
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
    delivered = delivery.answer_delivered(site, item, None, ctx)
    assert (delivered.state, delivered.counters, delivered.mails) == (CaseState.PURGED, ("answered",), ())
    failed = delivery.answer_failed(site, item, REFUSED, ctx)
    assert failed.state is CaseState.OPEN and [m.recipients for m in failed.mails] == [(STAFF,), (STAFF2,)]
    notice = failed.mails[0].message
    assert b"code 550" in b" ".join(notice.split()) and CUSTOMER.encode() not in notice  # wrapped at 72
    assert len(failed.nonce) == 8 and failed.nonce != "0a1b2c3d"  # old reply addresses stop verifying
    again = delivery.answer_failed(site, replace(item, id=2), REFUSED, ctx)
    assert again.nonce != failed.nonce  # each failed answer issues new ones
    for staff, notice in zip((STAFF, STAFF2), failed.mails, strict=True):
        reply_address = ctx.addressing.reply_address(site, "c0ffee000001", failed.nonce, staff)
        assert f"Reply-To: {reply_address}".encode() in notice.message


def test_a_failed_answers_notice_goes_to_the_staff_of_the_case_the_answer_carries(ctx: Context) -> None:
    routed = "refunds@staff.example"
    site = replace(ctx.config.sites[0], routes=(Route("refunds", "", None, (routed,), "all"),))
    answer = OutgoingMail(MailKind.ANSWER, "c0ffee000001", CARE, (CUSTOMER,), b"x", "m@x", route="refunds")
    failed = delivery.answer_failed(site, QueuedMail(1, site.id, 3, time.time(), answer), REFUSED, ctx)
    assert [m.recipients for m in failed.mails] == [(routed,)]  # not the site's own staff
    reply_address = ctx.addressing.reply_address(site, answer.case_id, failed.nonce, routed)
    assert f"Reply-To: {reply_address}".encode() in failed.mails[0].message
    unrouted = QueuedMail(1, site.id, 3, time.time(), replace(answer, route=""))
    assert [m.recipients for m in delivery.answer_failed(site, unrouted, REFUSED, ctx).mails] == [(STAFF,), (STAFF2,)]


def test_the_digest_lists_each_staff_members_cases_oldest_first_with_their_own_reply_addresses(
        ctx: Context) -> None:
    site = ctx.config.site("ticketnest")
    assert site is not None
    now = time.time()
    older, newer = (OpenCase(f"c0ffee00000{i}", now - age, f"0a1b2c3{i}", "", "") for i, age in ((1, 3 * 86400),
                                                                                                 (2, 3600)))
    mails = DIGEST(site, [older, newer], now, ctx, "digest-key")
    assert sorted(m.recipients for m in mails) == sorted((s,) for s in site.all_staff)
    for mail in mails:
        assert mail.kind is MailKind.NOTICE and mail.case_id == "digest-key" and mail.sender == ""
        text = message_from_bytes(mail.message, policy=policy.default).get_body(("plain",)).get_content()
        assert text.index(older.id) < text.index(newer.id)  # oldest first
        for case in (older, newer):  # each staff member's own address: honoured from them only
            address = ctx.addressing.reply_address(site, case.id, case.nonce, mail.recipients[0])
            assert address in text
            token = ctx.addressing.check_reply_token(site, address.split("+", 1)[1].split("@")[0])
            assert token is not None and token.staff == mail.recipients[0]
    assert DIGEST(site, [], now, ctx, "digest-key") == ()  # nothing open: no mail
    at = clock_time(8, 0)
    morning = time.mktime(time.strptime("2026-12-02 07:59", "%Y-%m-%d %H:%M"))
    assert digest.due_day(at, morning) == "" and digest.due_day(None, morning + 3600) == ""
    assert digest.due_day(at, morning + 60) == digest.due_day(at, morning + 12 * 3600) == "2026-12-02"


class RecordedTexts(Texts):
    """The real texts, keeping the key and values (the site left out) of each notice a stage asks for."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx.config.templates_dir, ctx.config.sites)
        self.notices: list[tuple[str, dict[str, object]]] = []

    def mail(self, site_id: str, name: str, /, language: str = "", **values: object) -> tuple[str, str]:
        if name.startswith(NOTICE_FOLDER):
            self.notices.append((name.removeprefix(NOTICE_FOLDER), {k: v for k, v in values.items() if k != "site"}))
        return super().mail(site_id, name, language, **values)


def test_stages_name_each_notice_by_its_key_and_values_never_by_its_words(ctx: Context) -> None:
    """The words are the site's language's (templates/mail/<language>/notices/): a stage passes a key
    and ids, staff names and numbers, nothing the text must say."""
    texts = RecordedTexts(ctx)
    ctx = replace(ctx, texts=texts)
    case = open_case(ctx)

    def verified(text: str) -> Inputs:
        return inputs(ctx, replace(reply_to(ctx, case, text), state=CaseState.VERIFIED), target=case)

    relay_answer.handle(verified(""), ctx)
    for text in ("#clossed", "#help", "#assign nobody", "#assign second"):
        command(ctx, case, text)
    loud = verified("Here is your refund.")
    relay_answer.handle(replace(loud, site=replace(loud.site, notify_answered=True)), ctx)
    verify_reply.handle(inputs(ctx, replace(loud.case, state=CaseState.STAFF_REPLY), target=None), ctx)
    verify_reply.handle(inputs(ctx, replace(loud.case, state=CaseState.STAFF_REPLY, target="")), ctx)
    expire.handle(inputs(ctx, replace(case, created=time.time() - 30 * 86400)), ctx)
    site = ctx.config.sites[0]
    item = QueuedMail(1, site.id, 3, time.time(), OutgoingMail(MailKind.ANSWER, case.id, CARE, (CUSTOMER,), b"x",
                                                                "m@x"))
    for failure in FAILURES:  # the relay's three ways to fail
        delivery.answer_failed(replace(site, staff=(STAFF,)), item, failure, ctx)
    on_case = {"case_id": case.id}
    assert texts.notices == [
        ("reply_empty", on_case), ("reply_unknown_command", on_case), ("help", on_case),
        ("assign_unknown", {**on_case, "staff": (STAFF, STAFF2)}),
        ("assigned", {**on_case, "owner": STAFF2, "sender": STAFF}),
        ("answered", {**on_case, "name": "Agent Smith", "sender": STAFF}),
        ("reply_late", on_case), ("reply_token_invalid", {"case_id": "-"}),
        ("expired", {**on_case, "days": 30}),
        ("answer_failed", {**on_case, "code": "550", "gave_up_after": 0}),
        ("answer_failed", {**on_case, "code": "451", "gave_up_after": 432000}),
        ("answer_failed", {**on_case, "code": "", "gave_up_after": 600}),
    ]
    assert {key for key, _ in texts.notices} <= set(NOTICES)


@pytest.mark.parametrize(("failure", "worded"), list(zip(FAILURES, (
    "the relay refused it permanently (code 550).",
    "temporary refusal (code 451); gave up after 432000 s.",
    "relay unreachable; gave up after 600 s.",
), strict=True)))
def test_an_undelivered_answers_notice_words_the_relays_reason_as_before(ctx: Context, failure: DeliveryFailure,
                                                                          worded: str) -> None:
    site = ctx.config.sites[0]
    item = QueuedMail(1, site.id, 3, time.time(), OutgoingMail(MailKind.ANSWER, "c0ffee000001", CARE, (CUSTOMER,),
                                                                b"x", "m@x"))
    notice = message(delivery.answer_failed(site, item, failure, ctx).mails[0])
    text = " ".join(notice.get_body(("plain",)).get_content().split())
    assert f"The answer was not delivered: {worded} The case is open again;" in text
