"""Stage VERIFIED: queue the staff answer to the customer, then drop the reply.

Only the staff member's new words go (careservice.replytext), as text and, when the reply has an
HTML part that shows the same words, also as sanitized HTML (careservice.htmlpart); a reply whose first line is a "#"
command goes to stage COMMAND (handlers.commands) instead; a reply without new words, one the parser
could not read whole, or one with an attached mail or reply address sends the customer nothing and
tells the staff member why.
"""

from __future__ import annotations

from dataclasses import replace

from careservice.config import Site
from careservice.context import Context, Inputs
from careservice.htmlpart import page
from careservice.mail import Draft, Parsed, new_message_id
from careservice.model import Case, CaseState, ContactDetails, MailKind, Outcome, OutgoingMail
from careservice.replytext import Forwarded, StaffReply, hide_addresses, read_reply, relay_problem
from careservice.routing import case_staff
from careservice.texts import separated

ANSWER_SLOT = "careservice-answer-slot-5f0c"  # stands for the answer in the template's frame of the HTML answer


def handle(inp: Inputs, ctx: Context) -> Outcome:
    site, parsed, target = inp.site, inp.parsed, inp.target
    if target is None or target.state is not CaseState.OPEN:
        return Outcome(CaseState.STAFF_REPLY, "target_changed")  # verify again: it sends the late notice
    problem = relay_problem(parsed, f"{target.id}.{target.nonce}")
    if problem:
        return not_sent(inp, ctx, target, problem)  # reply_unreadable, reply_attached_mail, reply_address_attached
    reply = staff_words(inp, ctx, target)
    if reply.command is not None:
        return Outcome(CaseState.COMMAND, "command")
    if not reply.text:
        return not_sent(inp, ctx, target, "reply_empty")
    customer = target.contact.email if target.contact else ""
    if not customer:
        return not_sent(inp, ctx, target, "no_customer_address")
    text = hide_addresses(reply.text, site.all_staff, site.care_address)  # signatures must not reveal staff addresses
    subject, body = ctx.texts.mail(site.id, "answer", target.language, site=site, subject=target.subject, text=text)
    html = ""
    if reply.html:  # framed by the text's own rendering, so the site's signature is in both or (the staff's
        # own signature holding it) in neither: the slot takes the place of the staff member's words
        frame = body.replace(separated(text.strip()), ANSWER_SLOT, 1)
        html = page(frame, ANSWER_SLOT, hide_addresses(reply.html, site.all_staff, site.care_address))
    draft = Draft(
        from_name=site.name, from_address=site.care_address, to=(customer,), subject=subject, text=body, html=html,
        message_id=new_message_id(site.domain), in_reply_to=target.message_id, references=target.references,
        attachments=parsed.attachments, loop_marker=ctx.config.smtp.hostname, language=target.language,
    )
    # carries who works the case: should the relay refuse it, its notice goes to the case's staff
    answer = replace(ctx.outgoing(MailKind.ANSWER, target.id, site.care_address, draft), route=target.route,
                     owner=target.owner)
    return Outcome(CaseState.PURGED, "answer_queued", mails=(answer, *tell_the_others(inp, ctx, target, "answered")),
                   target_state=CaseState.ANSWERING)


def not_sent(inp: Inputs, ctx: Context, target: Case, reason: str, **values: object) -> Outcome:
    """Drop the reply and tell its sender why the customer got nothing (the notice `reason`, given
    `values`); the case stays open."""
    notice = ctx.notice(inp.site, (inp.parsed.from_address,), reason, about=target.id, filed_under=inp.case.id,
                        answers=inp.parsed, **values)
    return Outcome(CaseState.PURGED, reason, mails=(notice,))


def tell_the_others(inp: Inputs, ctx: Context, target: Case, done: str) -> tuple[OutgoingMail, ...]:
    """With the site's `notify_answered`, the other staff hear that the case needs nothing more from them
    (the notice `done`: "answered" or "closed"). Filed under the reply, not the case: the case's purge
    must not take the notice with it."""
    site, sender = inp.site, inp.parsed.from_address
    others = tuple(s for s in case_staff(site, target) if s.casefold() != sender.casefold())
    if not site.notify_answered or not others:
        return ()
    return (ctx.notice(site, others, done, name=inp.parsed.from_name or sender, sender=sender, about=target.id,
                       filed_under=inp.case.id),)


def staff_words(inp: Inputs, ctx: Context, target: Case) -> StaffReply:
    """What the staff member wrote in the reply `inp`, without the quote and the forward's own lines."""
    assert inp.target_parsed is not None  # parsed by the runner for this state (handlers.READS_TARGET)
    return read_reply(inp.parsed.text, inp.parsed.html, _forwarded(ctx, inp.site, target, inp.target_parsed))


def _forwarded(ctx: Context, site: Site, target: Case, customer: Parsed) -> Forwarded:
    """The forward staff got for `target` (whose message is `customer`): its own blocks (rendered again
    without the customer's text, as a first message and as a follow-up) and the customer's text."""
    contact = target.contact or ContactDetails("", "")
    blocks = [ctx.texts.mail(site.id, "forward", site=site, case_id=target.id, subject=target.subject,
                             contact=contact, text="", follow_up=follow_up)[1] for follow_up in (False, True)]
    return Forwarded.of(blocks, customer.text)
