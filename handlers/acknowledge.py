"""Stage ACKNOWLEDGE: tell the customer at once that their message arrived (never echoing it)."""

from __future__ import annotations

from careservice.context import Context, Inputs
from careservice.mail import Draft
from careservice.model import AckSlot, CaseState, MailKind, Outcome
from careservice.spamverdict import read as spam_verdict


def handle(inp: Inputs, ctx: Context) -> Outcome:
    case, site = inp.case, inp.site
    customer = case.contact.email if case.contact else ""
    if not customer or ctx.addressing.is_ours(customer):
        return Outcome(CaseState.OPEN, "no_ack_address", counters=("ack_suppressed",))
    verdict = spam_verdict(case.raw)  # an acknowledgement to a forged sender is backscatter
    if verdict is not None and verdict.result in ("suspect", "unavailable"):
        return Outcome(CaseState.OPEN, f"no_ack_spam_{verdict.state}", counters=("ack_suppressed",))
    subject, text = ctx.texts.mail(site.id, "ack", site=site, case_id=case.id, contact=case.contact)
    draft = Draft(
        from_name=site.name, from_address=site.care_address, to=(customer,), subject=subject, text=text,
        message_id=ctx.addressing.ack_message_id(site, case.id, case.nonce), in_reply_to=case.message_id,
        references=case.references, automatic=True, loop_marker=ctx.config.smtp.hostname,
    )
    return Outcome(CaseState.OPEN, "acknowledged", mails=(ctx.outgoing(MailKind.ACK, case.id, "", draft),),
                   ack_slot=AckSlot(ctx.keyring.digest(customer.lower()), ctx.config.acks_per_hour))
