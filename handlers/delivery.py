"""Events ANSWER_DELIVERED and ANSWER_FAILED: what the relay's word on an answer means for its case."""

from __future__ import annotations

from careservice.config import Site
from careservice.context import Context
from careservice.model import CaseState, Outcome, QueuedMail


def answer_delivered(site: Site, item: QueuedMail, why: str, ctx: Context) -> Outcome:
    """The relay took the answer: the case is purged in the same transaction."""
    return Outcome(CaseState.PURGED, "answered", counters=("answered",))


def answer_failed(site: Site, item: QueuedMail, why: str, ctx: Context) -> Outcome:
    """The relay refused the answer for good, or it was given up: the case opens again and staff hear."""
    case_id = item.mail.case_id
    notice = ctx.notice(site, site.staff, "Answer could not be delivered",
                        f"The answer was not delivered: {why}. The case is open again; reply to the "
                        "forwarded case to try again.", about=case_id, filed_under=case_id)
    return Outcome(CaseState.OPEN, "answer_failed", mails=(notice,))
