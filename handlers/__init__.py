"""The whole case workflow on one screen: which stage runs for a case in each state.

    RECEIVED    --classify-->      NEW | FOLLOW_UP | STAFF_REPLY | PURGED (auto-reply, bounce, list, loop,
                                                                          a sender marked "#spam")
    NEW         --forward-->       ACKNOWLEDGE                     (a copy per staff address, each its own Reply-To)
    ACKNOWLEDGE --acknowledge-->   OPEN                            (ack to the customer in the case's language,
                                                                    unless suppressed)
    FOLLOW_UP   --forward-->       PURGED                          (forwarded under the open case, threaded to
                                                                    each staff member's first forward, its quote
                                                                    of the acknowledgement removed)
    STAFF_REPLY --verify_reply-->  VERIFIED | PURGED               (token from the staff From it was issued to,
                                                                    staff_auth passed; else refuse/notice)
    VERIFIED    --relay_answer-->  PURGED, case -> ANSWERING       (answer queued; no new text: notice, case OPEN)
                                   | COMMAND                       (the first line starts with "#")
    COMMAND     --commands-->      PURGED                          ("#closed"/"#phone": case purged; "#note": to the
                                                                    other staff; "#assign": forward to one of them;
                                                                    "#spam": case purged, its sender blocked;
                                                                    "#help" or an unknown "#": notice; case OPEN)
    OPEN        --expire-->        OPEN | PURGED                   (a reminder at each retention.remind_after age;
                                                                    purged when retention.unanswered_days pass)
    ANSWERING   events from the relay (EVENTS): ANSWER_DELIVERED purges the case;
                ANSWER_FAILED (refused for good, or given up) makes it OPEN again under new reply
                addresses and tells the case's staff
    DIGEST      once a day per site, from [digest] at (the worker, with the OPEN cases): one mail per staff
                member listing the cases they may answer, each with their own reply address; no case moves

Who works a case (careservice.routing): NEW takes the first [[sites.routes]] entry that matches (recipient,
subject or a form's query text), else the site's own staff; under assign = "round_robin" one of them in
turn becomes its owner (Outcome.turn). Forwards, notes, reminders, "#assign" and the notice of an answer the
relay did not take (its route and owner go with the queued answer) go to the case's staff;
its staff and the site's own may answer it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from careservice.config import Site
from careservice.context import Context, Inputs
from careservice.model import CaseState, DeliveryFailure, MailEvent, OpenCase, Outcome, OutgoingMail, QueuedMail

from . import acknowledge, classify, commands, delivery, digest, expire, forward, relay_answer, verify_reply

Stage = Callable[[Inputs, Context], Outcome]  # pure: the runner loads the inputs and commits the outcome
# the outbox commits it with the delivery record; the failure's facts for ANSWER_FAILED, else None
Event = Callable[[Site, QueuedMail, DeliveryFailure | None, Context], Outcome]
# the worker queues its mails, filed under a key of their own (the last argument), with the day's date
Digest = Callable[[Site, Sequence[OpenCase], float, Context, str], tuple[OutgoingMail, ...]]

STAGES: dict[CaseState, Stage] = {
    CaseState.RECEIVED: classify.handle,
    CaseState.NEW: forward.new_case,
    CaseState.ACKNOWLEDGE: acknowledge.handle,
    CaseState.FOLLOW_UP: forward.follow_up,
    CaseState.STAFF_REPLY: verify_reply.handle,
    CaseState.VERIFIED: relay_answer.handle,
    CaseState.COMMAND: commands.handle,
    CaseState.OPEN: expire.handle,
}

EVENTS: dict[MailEvent, Event] = {
    MailEvent.ANSWER_DELIVERED: delivery.answer_delivered,
    MailEvent.ANSWER_FAILED: delivery.answer_failed,
}

# the stages that read the target's own message (the customer's words in a staff reply's quote, the forward
# "#assign" sends again): the runner parses it for them, once per chain, into Inputs.target_parsed
READS_TARGET: frozenset[CaseState] = frozenset({CaseState.VERIFIED, CaseState.COMMAND})

DIGEST: Digest = digest.daily
