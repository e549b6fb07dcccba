"""Events ANSWER_DELIVERED and ANSWER_FAILED: what the relay's word on an answer means for its case."""

from __future__ import annotations

import hashlib
import re

from careservice.config import Site
from careservice.context import Context
from careservice.model import CaseState, Outcome, QueuedMail


def answer_delivered(site: Site, item: QueuedMail, why: str, ctx: Context) -> Outcome:
    """The relay took the answer: the case is purged in the same transaction."""
    return Outcome(CaseState.PURGED, "answered", counters=("answered",))


def answer_failed(site: Site, item: QueuedMail, why: str, ctx: Context) -> Outcome:
    """The relay refused the answer for good, or it was given up: the case opens again under a new nonce,
    so the reply addresses issued before stop working, and each staff member gets a notice whose
    Reply-To is their new one."""
    case_id = item.mail.case_id
    # derived, not drawn, to keep the event a pure function: the failed mail's row id differs per answer,
    # and the keyed MAC keeps it unguessable
    nonce = hashlib.sha256(ctx.keyring.sign(f"reopen|{site.id}|{case_id}|{item.id}".encode()).encode()).hexdigest()[:8]
    notices = tuple(ctx.notice(site, (staff,), "answer_failed", about=case_id, filed_under=case_id,
                               reply_to=ctx.addressing.reply_address(site, case_id, nonce, staff), **_failure(why))
                    for staff in site.staff)
    return Outcome(CaseState.OPEN, "answer_failed", mails=notices, nonce=nonce)


def _failure(why: str) -> dict[str, object]:
    """The facts of the outbox's `why` that the notice words in the site's language: the relay's reply
    `code` ("" when it was not reached) and `gave_up_after` (seconds; 0 when refused for good). The outbox
    says "the relay refused it permanently (code 550)", "temporary refusal (code 451); gave up after
    432000 s" or "relay unreachable; gave up after 432000 s"."""
    code, gave_up = re.search(r"\bcode (\d{3})\b", why), re.search(r"\bgave up after (\d+) s\b", why)
    return {"code": code.group(1) if code else "", "gave_up_after": int(gave_up.group(1)) if gave_up else 0}
