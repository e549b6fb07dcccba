"""The whole case workflow on one screen: which stage runs for a case in each state.

    RECEIVED    --classify-->      NEW | FOLLOW_UP | STAFF_REPLY | PURGED (auto-reply, bounce, list, loop)
    NEW         --forward-->       ACKNOWLEDGE                     (case mailed to every staff address)
    ACKNOWLEDGE --acknowledge-->   OPEN                            (ack to the customer, unless suppressed)
    FOLLOW_UP   --forward-->       PURGED                          (forwarded under the open case)
    STAFF_REPLY --verify_reply-->  VERIFIED | PURGED               (token + staff From; else refuse/notice)
    VERIFIED    --relay_answer-->  PURGED, case -> ANSWERING       (answer queued; "#closed"/"#phone": case purged;
                                                                    no new text or an unknown "#": notice, case OPEN)
    OPEN        --expire-->        PURGED                          (when retention.unanswered_days pass)
    ANSWERING   the relay's 250 for the answer purges the case (Store.mail_delivered)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from careservice.context import Context
from careservice.model import Case, CaseState, Outcome

from . import acknowledge, classify, expire, forward, relay_answer, verify_reply

Stage = Callable[[Case, Context], Awaitable[Outcome]]

STAGES: dict[CaseState, Stage] = {
    CaseState.RECEIVED: classify.handle,
    CaseState.NEW: forward.new_case,
    CaseState.ACKNOWLEDGE: acknowledge.handle,
    CaseState.FOLLOW_UP: forward.follow_up,
    CaseState.STAFF_REPLY: verify_reply.handle,
    CaseState.VERIFIED: relay_answer.handle,
    CaseState.OPEN: expire.handle,
}
