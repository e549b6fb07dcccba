"""Stage OPEN (when due): an unanswered case past retention.unanswered_days is purged, staff told."""

from __future__ import annotations

from careservice.context import Context, Inputs
from careservice.model import CaseState, Outcome


def handle(inp: Inputs, ctx: Context) -> Outcome:
    site, case = inp.site, inp.case
    notice = ctx.notice(site, site.staff, "Expired unanswered, deleted",
                        f"Nobody answered this case within {ctx.config.unanswered_days} days, so it was "
                        "deleted as our privacy policy requires. Replies to it are no longer sent.",
                        about=case.id, filed_under=case.id)
    return Outcome(CaseState.PURGED, "expired", mails=(notice,), counters=("expired",))
