"""Stage STAFF_REPLY: a reply is genuine only with our current token for an open case, from the staff
address it was issued to, who may answer that case (careservice.routing), authenticated as the site's
staff_auth asks (careservice.staffauth)."""

from __future__ import annotations

from careservice.context import Context, Inputs
from careservice.model import CaseState, Outcome
from careservice.routing import answerers, case_staff
from careservice.staffauth import authenticated

from .classify import reply_token


def handle(inp: Inputs, ctx: Context) -> Outcome:
    case, site = inp.case, inp.site
    sender = inp.parsed.from_address
    if inp.parsed.from_count != 1 or sender not in site.all_staff:
        if not case.target:  # no reply address of ours either: nobody to tell
            return Outcome(CaseState.PURGED, "reply_not_from_staff", counters=("reply_refused",))
        # A valid reply address from elsewhere is most likely staff writing from an alias, who would
        # believe the customer answered: all staff hear of it (the sender and its text stay unnamed).
        told = case_staff(site, inp.target) if inp.target is not None else site.staff
        notice = ctx.notice(site, told, "reply_not_from_staff", about=case.target, filed_under=case.id)
        return Outcome(CaseState.PURGED, "reply_not_from_staff", mails=(notice,), counters=("reply_refused",))
    if not authenticated(site.staff_auth, case.message.raw, sender, inp.dkim_domains):
        # perhaps forged; if not, the staff member's mail setup needs fixing: the From hears either way
        return _refused(inp, ctx, "reply_unauthenticated")
    if not case.target:
        notice = ctx.notice(site, (sender,), "reply_token_invalid", about="", filed_under=case.id, answers=inp.parsed)
        return Outcome(CaseState.PURGED, "reply_token_invalid", mails=(notice,), counters=("reply_refused",))
    if inp.target is None or inp.target.state is not CaseState.OPEN:
        notice = ctx.notice(site, (sender,), "reply_late", about=case.target, filed_under=case.id,
                            answers=inp.parsed)
        return Outcome(CaseState.PURGED, "reply_late", mails=(notice,), counters=("reply_late",))
    issued = ctx.addressing.check_reply_token(site, reply_token(inp, ctx))
    if issued is None or issued.staff != sender:
        return _refused(inp, ctx, "reply_other_staff")
    if sender not in answerers(site, inp.target):  # issued before a reload took the sender off its route
        return _refused(inp, ctx, "reply_not_case_staff")
    if issued.nonce != inp.target.nonce:
        return _refused(inp, ctx, "reply_token_stale")
    return Outcome(CaseState.VERIFIED, "reply_verified")


def _refused(inp: Inputs, ctx: Context, reason: str) -> Outcome:
    """Drop a reply from a staff address and tell that address why (the notice `reason`)."""
    notice = ctx.notice(inp.site, (inp.parsed.from_address,), reason, about=inp.case.target,
                        filed_under=inp.case.id, answers=inp.parsed)
    return Outcome(CaseState.PURGED, reason, mails=(notice,), counters=("reply_refused",))
