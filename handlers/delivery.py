"""Events ANSWER_DELIVERED and ANSWER_FAILED: what the relay's word on an answer means for its case."""

from __future__ import annotations

import hashlib

from careservice.config import Site
from careservice.context import Context
from careservice.model import CaseState, DeliveryFailure, Outcome, QueuedMail
from careservice.routing import case_staff


def answer_delivered(site: Site, item: QueuedMail, failure: DeliveryFailure | None, ctx: Context) -> Outcome:
    """The relay took the answer: the case is purged in the same transaction."""
    return Outcome(CaseState.PURGED, "answered", counters=("answered",))


def answer_failed(site: Site, item: QueuedMail, failure: DeliveryFailure | None, ctx: Context) -> Outcome:
    """The relay refused the answer for good, or it was given up: the case opens again under a new nonce,
    so the reply addresses issued before stop working, and each of the case's staff (by the route and owner
    the answer carries) gets a notice whose Reply-To is their new one, with the relay's reply `code` (""
    when it was not reached) and `gave_up_after` (seconds; 0 when refused for good) for the site's
    language to word."""
    assert failure is not None  # the outbox hands every failed answer its failure
    case_id = item.mail.case_id
    # derived, not drawn, to keep the event a pure function: the failed mail's row id differs per answer,
    # and the keyed MAC keeps it unguessable
    nonce = hashlib.sha256(ctx.keyring.sign(f"reopen|{site.id}|{case_id}|{item.id}".encode()).encode()).hexdigest()[:8]
    code = "" if failure.code is None else str(failure.code)
    notices = tuple(ctx.notice(site, (staff,), "answer_failed", about=case_id, filed_under=case_id,
                               reply_to=ctx.addressing.reply_address(site, case_id, nonce, staff), code=code,
                               gave_up_after=failure.gave_up_after or 0)
                    for staff in case_staff(site, item.mail))
    return Outcome(CaseState.OPEN, "answer_failed", mails=notices, nonce=nonce)
