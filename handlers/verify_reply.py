"""Stage STAFF_REPLY: a reply is genuine only with our token for an open case and a staff From."""

from __future__ import annotations

from careservice.context import Context, Inputs
from careservice.model import CaseState, Outcome


def handle(inp: Inputs, ctx: Context) -> Outcome:
    case, site = inp.case, inp.site
    sender = inp.parsed.from_address
    if inp.parsed.from_count != 1 or sender not in site.staff:
        if not case.target:  # no reply address of ours either: nobody to tell
            return Outcome(CaseState.PURGED, "reply_not_from_staff", counters=("reply_refused",))
        # A valid reply address from elsewhere is most likely staff writing from an alias, who would
        # believe the customer answered: all staff hear of it (the sender and its text stay unnamed).
        notice = ctx.notice(site, site.staff, "Reply refused because of its sender",
                            "A reply to this case came from an address that is not on the staff list, so "
                            "nothing was sent to the customer. If one of you wrote it, please answer again "
                            "from your staff address.", about=case.target, filed_under=case.id)
        return Outcome(CaseState.PURGED, "reply_not_from_staff", mails=(notice,), counters=("reply_refused",))
    if not case.target:
        notice = ctx.notice(site, (sender,), "Your reply was not sent",
                            "The reply address was not valid (changed or not issued by us), so nothing "
                            "was sent to anyone. Reply to the original forwarded case instead.",
                            about="", filed_under=case.id)
        return Outcome(CaseState.PURGED, "reply_token_invalid", mails=(notice,), counters=("reply_refused",))
    if inp.target is None or inp.target.state is not CaseState.OPEN:
        notice = ctx.notice(site, (sender,), "Already answered, nothing sent",
                            "This case was already answered, closed or expired, and its data is deleted. "
                            "Your reply was not sent to anyone.", about=case.target, filed_under=case.id)
        return Outcome(CaseState.PURGED, "reply_late", mails=(notice,), counters=("reply_late",))
    return Outcome(CaseState.VERIFIED, "reply_verified")
