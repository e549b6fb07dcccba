"""Stage COMMAND: a genuine staff reply whose first line is "#word": act on the case, never mail the customer.

The command's words (the rest of its line and the lines below, without the quote) are a note's
text or the name of a staff member. Every mail here is filed under the case, so its key encrypts
it and its purge removes it; an unknown word gets the list of commands back (the notices' texts,
mail/<language>/commands.txt, word them per language).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from careservice.context import Context, Inputs
from careservice.mail import Draft, new_message_id
from careservice.model import Case, CaseState, MailKind, Outcome, SenderBlock
from careservice.routing import answerers, case_staff

from .forward import _to_staff
from .relay_answer import not_sent, staff_words, tell_the_others

Command = Callable[[Inputs, Context, Case, str], Outcome]


def handle(inp: Inputs, ctx: Context) -> Outcome:
    target = inp.target
    if target is None or target.state is not CaseState.OPEN:
        return Outcome(CaseState.STAFF_REPLY, "target_changed")  # verify again: it sends the late notice
    reply = staff_words(inp, ctx, target)
    command = COMMANDS.get(reply.command or "")
    if command is None:
        return not_sent(inp, ctx, target, "reply_unknown_command")
    return command(inp, ctx, target, reply.words)


def _close(inp: Inputs, ctx: Context, target: Case, words: str) -> Outcome:
    return Outcome(CaseState.PURGED, "closed_by_phone", mails=tell_the_others(inp, ctx, target, "closed"),
                   target_state=CaseState.PURGED, counters=("closed_by_phone",))


def _note(inp: Inputs, ctx: Context, target: Case, words: str) -> Outcome:
    site, author = inp.site, inp.parsed.from_address
    others = tuple(s for s in case_staff(site, target) if s.casefold() != author.casefold())
    if not words:
        return not_sent(inp, ctx, target, "note_empty")
    if not others:
        return not_sent(inp, ctx, target, "note_nobody")
    subject, text = ctx.texts.mail(site.id, "note", site=site, case_id=target.id, subject=target.subject,
                                   author=author, text=words)
    notes = tuple(ctx.outgoing(MailKind.NOTE, target.id, site.care_address, Draft(
        from_name=f"{site.name} careservice", from_address=site.care_address, to=(staff,), subject=subject,
        text=text, message_id=new_message_id(site.domain), automatic=True, loop_marker=ctx.config.smtp.hostname,
        reply_to=ctx.addressing.reply_address(site, target.id, target.nonce, staff),  # each their own token
        in_reply_to=ctx.addressing.forward_message_id(site, target.id, staff),  # in their thread of the case
    )) for staff in others)
    return Outcome(CaseState.PURGED, "note_sent", mails=notes, counters=("notes",))


def _assign(inp: Inputs, ctx: Context, target: Case, words: str) -> Outcome:
    site, sender = inp.site, inp.parsed.from_address
    wanted = words.split()[0].strip("<>").casefold() if words.split() else ""
    staff = answerers(site, target)
    chosen = [s for s in staff if wanted in (s.casefold(), s.rpartition("@")[0].casefold())]
    if len(chosen) != 1:
        return not_sent(inp, ctx, target, "assign_unknown", staff=staff)
    owner = chosen[0]
    assert inp.target_parsed is not None  # parsed by the runner for this state (handlers.READS_TARGET)
    original = replace(inp, case=target, parsed=inp.target_parsed)
    forwards = _to_staff(original, ctx, target, follow_up=False, to=(owner,))
    others = tuple(s for s in case_staff(site, target) if s != owner)
    told = (ctx.notice(site, others, "assigned", owner=owner, sender=sender, about=target.id,
                       filed_under=target.id),) if others else ()
    return Outcome(CaseState.PURGED, "assigned", mails=(*forwards, *told), counters=("assigned",), target_owner=owner)


def _spam(inp: Inputs, ctx: Context, target: Case, words: str) -> Outcome:
    """Purge the case and discard its sender's later mail (classify), known only by keyed digests."""
    addresses = {target.contact.email if target.contact else "", target.message.envelope.mail_from} - {""}
    block = SenderBlock(tuple(sorted(ctx.keyring.block_digest(a) for a in addresses)),
                        inp.now + ctx.config.spam.block_days * 86400.0)
    return Outcome(CaseState.PURGED, "marked_spam", target_state=CaseState.PURGED, counters=("spam_marked",),
                   block=block)


def _help(inp: Inputs, ctx: Context, target: Case, words: str) -> Outcome:
    notice = ctx.notice(inp.site, (inp.parsed.from_address,), "help", about=target.id, filed_under=inp.case.id,
                        answers=inp.parsed)
    return Outcome(CaseState.PURGED, "help_sent", mails=(notice,))


COMMANDS: dict[str, Command] = {"closed": _close, "phone": _close, "note": _note, "assign": _assign, "spam": _spam,
                                 "help": _help}
