"""Stage RECEIVED: decide what an inbound message is (discard, staff reply, follow-up or new case)."""

from __future__ import annotations

from dataclasses import replace

from careservice.context import Context, Inputs
from careservice.model import CaseState, ContactDetails, Outcome, Source


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
                      references=parsed.references)
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
    """The reply token this message was sent to ("" for none). Over SMTP only the envelope recipient
    counts: a token copied into To, Cc or Delivered-To of mail to the care address is just text. A
    mailbox fetched over IMAP has no envelope (its rcpt is the care address), so there the To, Cc,
    Delivered-To and X-Original-To headers are all there is."""
    addresses = inp.parsed.recipients if inp.case.message.source is Source.IMAP else (inp.case.message.envelope.rcpt,)
    tokens = [r.token for r in map(ctx.addressing.recipient, addresses)
              if r is not None and r.site.id == inp.site.id and r.token]
    return tokens[0] if tokens else ""
