"""Stages NEW and FOLLOW_UP: send the customer's message to the case's staff (careservice.routing: the
route that took it, or the site's own staff; its owner alone when it has one).

Each staff address gets its own copy, whose Reply-To is honoured only from that address, and each
staff member's later forwards of the case are threaded to their first.
"""

from __future__ import annotations

from careservice.context import Context, Inputs
from careservice.mail import Draft, new_message_id
from careservice.model import Case, CaseState, ContactDetails, MailKind, Outcome, OutgoingMail
from careservice.replytext import Forwarded, unquoted
from careservice.routing import forward_to, route_new_case
from careservice.spamverdict import read as spam_verdict


def _to_staff(inp: Inputs, ctx: Context, owner: Case, follow_up: bool,
              to: tuple[str, ...] = (), first: bool = False) -> tuple[OutgoingMail, ...]:
    """The forwards of the message in `inp`, one per staff address in `to` (when empty, the case's owner or
    else its staff), each with its own reply address, filed under (and answerable for) the case `owner`.

    The `first` forward of a case has a Message-ID derived from the case and the staff address; every
    later one (a follow-up, an assignment) is threaded to it, so each staff member sees one thread.
    A follow-up is forwarded without what it quotes of our acknowledgement."""
    site = inp.site
    contact = inp.case.contact or ContactDetails("", "")
    text = _unquoted_follow_up(inp, ctx, owner) if follow_up else inp.parsed.text
    subject, text = ctx.texts.mail(site.id, "forward", site=site, case_id=owner.id, subject=owner.subject,
                                   contact=contact, text=text, follow_up=follow_up)
    verdict = spam_verdict(inp.case.message.raw)  # this message's own verdict, also for a follow-up
    if verdict is not None and verdict.state == "suspect":
        subject = f"[spam?] {subject}"
    mails = []
    for staff in to or forward_to(site, owner):
        thread = ctx.addressing.forward_message_id(site, owner.id, staff)
        draft = Draft(
            from_name=f"{contact.name or contact.email or 'Customer'} via {site.name}",
            from_address=site.care_address, to=(staff,), subject=subject, text=text,
            message_id=thread if first else new_message_id(site.domain), in_reply_to="" if first else thread,
            reply_to=ctx.addressing.reply_address(site, owner.id, owner.nonce, staff),
            attachments=inp.parsed.attachments_and_html, loop_marker=ctx.config.smtp.hostname,
        )
        mails.append(ctx.outgoing(MailKind.FORWARD, owner.id, site.care_address, draft))
    return tuple(mails)


def _unquoted_follow_up(inp: Inputs, ctx: Context, owner: Case) -> str:
    """The follow-up's text without its quote of the acknowledgement of `owner` (rendered again, so that
    an unmarked copy of it, as Outlook makes, is known to its last line)."""
    ack = ctx.texts.mail(inp.site.id, "ack", owner.language, site=inp.site, case_id=owner.id,
                         contact=owner.contact or ContactDetails("", ""))[1]
    return unquoted(inp.parsed.text, inp.parsed.html, Forwarded.of([ack], ""))


def new_case(inp: Inputs, ctx: Context) -> Outcome:
    case, turn = route_new_case(inp)
    mails = _to_staff(inp, ctx, case, follow_up=False, first=True)
    return Outcome(CaseState.ACKNOWLEDGE, "forwarded", mails=mails, updates=case, counters=("opened",), turn=turn)


def follow_up(inp: Inputs, ctx: Context) -> Outcome:
    """Forward a follow-up under its open case, then drop it; a case gone meanwhile makes it new."""
    owner = inp.target
    if owner is None or owner.state is not CaseState.OPEN:
        return Outcome(CaseState.NEW, "follow_up_case_gone")
    mails = _to_staff(inp, ctx, owner, follow_up=True)
    return Outcome(CaseState.PURGED, "follow_up_forwarded", mails=mails, counters=("follow_ups",))
