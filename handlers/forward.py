"""Stages NEW and FOLLOW_UP: send the customer's message to every staff address of the site."""

from __future__ import annotations

from careservice.context import Context
from careservice.mail import Draft, new_message_id
from careservice.model import Case, CaseState, ContactDetails, MailKind, Outcome, OutgoingMail


async def _to_staff(case: Case, ctx: Context, owner: Case, follow_up: bool) -> OutgoingMail:
    """The forward of `case`'s message, filed under (and answerable for) the case `owner`."""
    site = ctx.site(case)
    parsed = ctx.parsed(case)
    contact = case.contact or ContactDetails("", "")
    subject, text = ctx.texts.mail(site.id, "forward", site=site, case_id=owner.id, subject=owner.subject,
                                   contact=contact, text=parsed.text, follow_up=follow_up)
    draft = Draft(
        from_name=f"{contact.name or contact.email or 'Customer'} via {site.name}",
        from_address=site.care_address, to=site.staff, subject=subject, text=text,
        message_id=new_message_id(site.domain), reply_to=ctx.addressing.reply_address(site, owner.id, owner.nonce),
        attachments=parsed.attachments, loop_marker=ctx.config.smtp.hostname,
    )
    return ctx.outgoing(MailKind.FORWARD, owner.id, site.care_address, draft)


async def new_case(case: Case, ctx: Context) -> Outcome:
    mail = await _to_staff(case, ctx, case, follow_up=False)
    return Outcome(CaseState.ACKNOWLEDGE, "forwarded", mails=(mail,), counters=("opened",))


async def follow_up(case: Case, ctx: Context) -> Outcome:
    """Forward a follow-up under its open case, then drop it; a case gone meanwhile makes it new."""
    owner = await ctx.store.get_case(case.target)
    if owner is None or owner.state is not CaseState.OPEN:
        return Outcome(CaseState.NEW, "follow_up_case_gone")
    mail = await _to_staff(case, ctx, owner, follow_up=True)
    return Outcome(CaseState.PURGED, "follow_up_forwarded", mails=(mail,), counters=("follow_ups",))
