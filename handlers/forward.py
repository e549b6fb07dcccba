"""Stages NEW and FOLLOW_UP: send the customer's message to every staff address of the site."""

from __future__ import annotations

from careservice.context import Context, Inputs
from careservice.mail import Draft, new_message_id
from careservice.model import Case, CaseState, ContactDetails, MailKind, Outcome, OutgoingMail


def _to_staff(inp: Inputs, ctx: Context, owner: Case, follow_up: bool, to: tuple[str, ...] = ()) -> OutgoingMail:
    """The forward of the message in `inp`, filed under (and answerable for) the case `owner`, to
    `to` (every staff address when empty)."""
    site = inp.site
    contact = inp.case.contact or ContactDetails("", "")
    subject, text = ctx.texts.mail(site.id, "forward", site=site, case_id=owner.id, subject=owner.subject,
                                   contact=contact, text=inp.parsed.text, follow_up=follow_up)
    draft = Draft(
        from_name=f"{contact.name or contact.email or 'Customer'} via {site.name}",
        from_address=site.care_address, to=to or site.staff, subject=subject, text=text,
        message_id=new_message_id(site.domain), reply_to=ctx.addressing.reply_address(site, owner.id, owner.nonce),
        attachments=inp.parsed.attachments, loop_marker=ctx.config.smtp.hostname,
    )
    return ctx.outgoing(MailKind.FORWARD, owner.id, site.care_address, draft)


def new_case(inp: Inputs, ctx: Context) -> Outcome:
    mail = _to_staff(inp, ctx, inp.case, follow_up=False)
    return Outcome(CaseState.ACKNOWLEDGE, "forwarded", mails=(mail,), counters=("opened",))


def follow_up(inp: Inputs, ctx: Context) -> Outcome:
    """Forward a follow-up under its open case, then drop it; a case gone meanwhile makes it new."""
    owner = inp.target
    if owner is None or owner.state is not CaseState.OPEN:
        return Outcome(CaseState.NEW, "follow_up_case_gone")
    mail = _to_staff(inp, ctx, owner, follow_up=True)
    return Outcome(CaseState.PURGED, "follow_up_forwarded", mails=(mail,), counters=("follow_ups",))
