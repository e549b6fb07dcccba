"""Stage RECEIVED: decide what an inbound message is (discard, staff reply, follow-up or new case)."""

from __future__ import annotations

from dataclasses import replace

from careservice.context import Context, Inputs
from careservice.model import CaseState, ContactDetails, Outcome


def handle(inp: Inputs, ctx: Context) -> Outcome:
    case, site, parsed = inp.case, inp.site, inp.parsed
    if inp.blocked:  # marked "#spam" by staff: no case, no acknowledgement
        return Outcome(CaseState.PURGED, "discard_blocked_sender", counters=("spam_discarded",))
    if parsed.automatic:
        return Outcome(CaseState.PURGED, f"discard_{parsed.automatic}", counters=("discarded",))
    if ctx.addressing.is_ours(parsed.from_address) or ctx.addressing.is_ours(case.message.envelope.mail_from):
        return Outcome(CaseState.PURGED, "discard_from_ourselves", counters=("discarded",))
    contact = case.contact or ContactDetails(parsed.from_name, parsed.from_address or case.message.envelope.mail_from)
    details = replace(case, contact=contact, subject=parsed.subject, message_id=parsed.message_id,
                      references=parsed.references, language=ctx.texts.choose(parsed.languages) or site.language)
    token = reply_token(inp, ctx)
    if token:
        checked = ctx.addressing.check_reply_token(site, token)
        return Outcome(CaseState.STAFF_REPLY, "reply_address",
                       updates=replace(details, target=checked.case_id if checked else ""))
    followed = ctx.addressing.followed_case(site, parsed.references)
    if followed:
        return Outcome(CaseState.FOLLOW_UP, "follow_up", updates=replace(details, target=followed))
    return Outcome(CaseState.NEW, "new_case", updates=details)


def reply_token(inp: Inputs, ctx: Context) -> str:
    """The reply token this message was sent to ("" for none): only its envelope recipient counts, the
    SMTP RCPT or, from a mailbox, the address its provider recorded on top at delivery
    (careservice.intake.headers.mailbox_envelope). A token copied into To, Cc or a lower Delivered-To
    is the sender's text: such mail to the care address is a new case like any other."""
    recipient = ctx.addressing.recipient(inp.case.message.envelope.rcpt)
    return recipient.token if recipient is not None and recipient.site.id == inp.site.id else ""
