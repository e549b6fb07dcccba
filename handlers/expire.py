"""Stage OPEN (when due): an unanswered case past retention.unanswered_days is purged, staff told."""

from __future__ import annotations

from careservice.context import Context
from careservice.model import Case, CaseState, Outcome


async def handle(case: Case, ctx: Context) -> Outcome:
    site = ctx.site(case)
    notice = ctx.notice(site, case.id, case.id, site.staff, "Expired unanswered, deleted",
                        f"Nobody answered this case within {ctx.config.unanswered_days} days, so it was "
                        "deleted as our privacy policy requires. Replies to it are no longer sent.")
    return Outcome(CaseState.PURGED, "expired", mails=(notice,), counters=("expired",))
