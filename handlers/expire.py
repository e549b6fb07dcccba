"""Stage OPEN (when due): remind the case's owner (or its staff) at each retention.remind_after age;
purge an unanswered case past retention.unanswered_days, staff told."""

from __future__ import annotations

from dataclasses import replace

from careservice.context import Context, Inputs
from careservice.mail import Draft, new_message_id
from careservice.model import CaseState, MailKind, Outcome
from careservice.routing import case_staff, forward_to

UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def handle(inp: Inputs, ctx: Context) -> Outcome:
    site, case = inp.site, inp.case
    age = inp.now - case.created
    if age < ctx.config.unanswered_days * 86400:
        reminders = ctx.config.remind_after[case.reminded:]
        if not reminders or age < reminders[0]:  # run before its time (e.g. moved back to OPEN): wait
            return Outcome(CaseState.OPEN, "not_due")
        subject, text = ctx.texts.mail(site.id, "reminder", site=site, case_id=case.id, age=spoken(age))
        to = forward_to(site, case)
        mails = tuple(ctx.outgoing(MailKind.NOTICE, case.id, "", Draft(
            from_name=f"{site.name} careservice", from_address=site.care_address, to=(staff,), subject=subject,
            text=text, message_id=new_message_id(site.domain), automatic=True, loop_marker=ctx.config.smtp.hostname,
            reply_to=ctx.addressing.reply_address(site, case.id, case.nonce, staff),  # each their own token
            in_reply_to=ctx.addressing.forward_message_id(site, case.id, staff),  # in their thread of the case
        )) for staff in to)
        # every reminder now due is sent as this one: a worker that was down does not send a burst
        passed = sum(1 for after in reminders if after <= age)
        return Outcome(CaseState.OPEN, "reminded", mails=mails,
                       updates=replace(case, reminded=case.reminded + passed), counters=("reminders",))
    notice = ctx.notice(site, case_staff(site, case), "expired", days=ctx.config.unanswered_days, about=case.id,
                        filed_under=case.id)
    return Outcome(CaseState.PURGED, "expired", mails=(notice,), counters=("expired",))


def spoken(seconds: float) -> str:
    """An age in its two largest units: "2 days 3 hours", "45 seconds"."""
    parts, left = [], int(seconds)
    for name, size in UNITS:
        if left >= size and len(parts) < 2:
            parts.append(f"{left // size} {name}{'s' if left // size != 1 else ''}")
            left %= size
    return " ".join(parts) or "0 seconds"
