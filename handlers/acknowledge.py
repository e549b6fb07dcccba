"""Stage ACKNOWLEDGE: tell the customer at once that their message arrived (never echoing it).

An acknowledgement goes to an address the mail only claims as its From, so it is sent only where that
claim holds up: a forged sender would otherwise get it (backscatter). It goes when the envelope sender
and the From agree, or rspamd found SPF or DMARC passing for the From domain, and never when both
failed; and within hourly limits per address (without a +tag, case-folded), per domain and overall.
"""

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
    verdict = spam_verdict(case.message.raw)
    if verdict is not None and verdict.result in ("suspect", "unavailable"):
        return Outcome(CaseState.OPEN, f"no_ack_spam_{verdict.state}", counters=("ack_suppressed",))
    passed = verdict is not None and "pass" in (verdict.spf, verdict.dmarc)
    if verdict is not None and verdict.spf == "fail" and verdict.dmarc == "fail":
        return Outcome(CaseState.OPEN, "no_ack_sender_failed", counters=("ack_suppressed",))
    if not passed and case.message.envelope.mail_from.casefold() != customer.casefold():
        return Outcome(CaseState.OPEN, "no_ack_sender_unverified", counters=("ack_suppressed",))
    subject, text = ctx.texts.mail(site.id, "ack", case.language, site=site, case_id=case.id, contact=case.contact)
    threading = (case.message_id,) if case.message_id else ()  # the only thing of theirs it carries
    draft = Draft(
        from_name=site.name, from_address=site.care_address, to=(customer,), subject=subject, text=text,
        message_id=ctx.addressing.ack_message_id(site, case.id, case.nonce), in_reply_to=case.message_id,
        references=threading, automatic=True, loop_marker=ctx.config.smtp.hostname, language=case.language,
    )
    return Outcome(CaseState.OPEN, "acknowledged", mails=(ctx.outgoing(MailKind.ACK, case.id, "", draft),),
                   ack_slot=AckSlot(rate_limits(customer, ctx)))


def rate_limits(address: str, ctx: Context) -> tuple[tuple[bytes, int], ...]:
    """The hourly limits an acknowledgement to `address` counts against, as keyed digests."""
    local, _, domain = address.casefold().rpartition("@")
    config = ctx.config
    return ((ctx.keyring.digest(f"ack address|{local.partition('+')[0]}@{domain}"), config.acks_per_hour),
            (ctx.keyring.digest(f"ack domain|{domain}"), config.acks_per_domain_per_hour),
            (ctx.keyring.digest("ack all"), config.acks_per_hour_total))
