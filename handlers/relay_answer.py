"""Stage VERIFIED: queue the staff answer to the customer (or close on #closed), then drop the reply."""

from __future__ import annotations

import re

from mailparser_reply import EmailReplyParser

from careservice.context import Context
from careservice.mail import Draft, new_message_id
from careservice.model import Case, CaseState, MailKind, Outcome

CLOSED_MARKER = "#closed"
REPLY_LANGUAGES = ["en", "de", "fr", "es", "it", "nl"]


def new_text(text: str) -> str:
    """The staff member's own words: the reply without the quoted case below it."""
    return EmailReplyParser(languages=REPLY_LANGUAGES).read(text=text).latest_reply or ""


async def handle(case: Case, ctx: Context) -> Outcome:
    site = ctx.site(case)
    target = await ctx.store.get_case(case.target)
    if target is None or target.state is not CaseState.OPEN:
        return Outcome(CaseState.STAFF_REPLY, "target_changed")  # verify again: it sends the late notice
    parsed = ctx.parsed(case)
    text = new_text(parsed.text).strip()
    if text.splitlines()[:1] == [CLOSED_MARKER] or text == CLOSED_MARKER:
        return Outcome(CaseState.PURGED, "closed_by_phone", target_state=CaseState.PURGED,
                       counters=("closed_by_phone",))
    customer = target.contact.email if target.contact else ""
    if not customer:
        notice = ctx.notice(site, target.id, case.id, (parsed.from_address,), "Answer not sent",
                            "The customer left no e-mail address; please use the telephone.")
        return Outcome(CaseState.PURGED, "no_customer_address", mails=(notice,))
    for staff in site.staff:  # signatures must not reveal a staff address
        text = re.sub(re.escape(staff), site.care_address, text, flags=re.IGNORECASE)
    subject, body = ctx.texts.mail(site.id, "answer", site=site, subject=target.subject, text=text)
    draft = Draft(
        from_name=site.name, from_address=site.care_address, to=(customer,), subject=subject, text=body,
        message_id=new_message_id(site.domain), in_reply_to=target.message_id, references=target.references,
        attachments=parsed.attachments, loop_marker=ctx.config.smtp.hostname,
    )
    answer = ctx.outgoing(MailKind.ANSWER, target.id, site.care_address, draft)
    return Outcome(CaseState.PURGED, "answer_queued", mails=(answer,), target_state=CaseState.ANSWERING)
