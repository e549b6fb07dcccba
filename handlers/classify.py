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
    if ctx.addressing.is_ours(parsed.from_address) or ctx.addressing.is_ours(case.envelope.mail_from):
        return Outcome(CaseState.PURGED, "discard_from_ourselves", counters=("discarded",))
    contact = case.contact or ContactDetails(parsed.from_name, parsed.from_address or case.envelope.mail_from)
    details = replace(case, contact=contact, subject=parsed.subject, message_id=parsed.message_id,
                      references=parsed.references)
    tokens = [r.token for r in map(ctx.addressing.recipient, (case.envelope.rcpt, *parsed.recipients))
              if r is not None and r.site.id == site.id and r.token]
    if tokens:
        checked = ctx.addressing.check_reply_token(site, tokens[0])
        return Outcome(CaseState.STAFF_REPLY, "reply_address",
                       updates=replace(details, target=checked.case_id if checked else ""))
    followed = ctx.addressing.followed_case(site, parsed.references)
    if followed:
        return Outcome(CaseState.FOLLOW_UP, "follow_up", updates=replace(details, target=followed))
    return Outcome(CaseState.NEW, "new_case", updates=details)
