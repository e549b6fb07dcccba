"""The daily digest: at `[digest] at` (local time) each staff member of a site gets one mail listing the
open cases they may answer (careservice.routing.answerers), oldest first: id, age, owner and a reply address
signed for them, like a forward's Reply-To, so writing to it answers the case. Nothing of the customer's,
not even the subject. The worker calls these with the open cases and its clock (careservice.worker); the
store queues the mails and remembers the day in one transaction, so a day's digest goes once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import time as clock_time

from careservice.config import Site
from careservice.context import Context
from careservice.mail import Draft, new_message_id
from careservice.model import MailKind, OpenCase, OutgoingMail
from careservice.routing import answerers

from .expire import spoken


def due_day(at: clock_time | None, now: float) -> str:
    """The local date ("2026-12-02") whose digest is due at `now`; "" before `at` that day, or with no
    digest configured. After `at` the day stays due, so a worker that was down at the time catches up."""
    if at is None:
        return ""
    local = time.localtime(now)
    if (local.tm_hour, local.tm_min) < (at.hour, at.minute):
        return ""
    return time.strftime("%Y-%m-%d", local)


def daily(site: Site, cases: Sequence[OpenCase], now: float, ctx: Context, filed_under: str,
          ) -> tuple[OutgoingMail, ...]:
    """The site's digest mails: one per staff member with a case to list, none when nothing is open. They
    are filed under `filed_under`, a key of their own (careservice.store.rota.queue_digest)."""
    mails = []
    for staff in site.all_staff:
        listed = [{"id": case.id, "age": spoken(now - case.created), "owner": case.owner,
                   "reply_address": ctx.addressing.reply_address(site, case.id, case.nonce, staff)}
                  for case in cases if staff in answerers(site, case)]
        if not listed:
            continue
        subject, text = ctx.texts.mail(site.id, "digest", site=site, cases=listed,
                                       day=time.strftime("%Y-%m-%d", time.localtime(now)))
        draft = Draft(from_name=f"{site.name} careservice", from_address=site.care_address, to=(staff,),
                      subject=subject, text=text, message_id=new_message_id(site.domain), automatic=True,
                      loop_marker=ctx.config.smtp.hostname)
        mails.append(ctx.outgoing(MailKind.NOTICE, filed_under, "", draft))
    return tuple(mails)
