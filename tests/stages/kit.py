"""What the stage tests share: a case as intake stores it, a stage's inputs, a staff reply to a forward."""

from __future__ import annotations

import time
from dataclasses import replace
from email import message_from_bytes
from email import policy
from email.message import EmailMessage

from careservice.context import Context
from careservice.context import Inputs
from careservice.handlers import classify
from careservice.handlers import commands
from careservice.handlers import forward
from careservice.handlers import relay_answer
from careservice.mail import parse
from careservice.model import Case
from careservice.model import CaseState
from careservice.model import Envelope
from careservice.model import Inbound
from careservice.model import Outcome
from careservice.model import OutgoingMail
from careservice.model import Source
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import customer_mail
from tests.support import staff_reply

CUSTOMER = "alice@customer.example"


def case_of(raw: bytes, state: CaseState = CaseState.RECEIVED, sender: str = CUSTOMER, rcpt: str = CARE,
            **fields: object) -> Case:
    message = Inbound(Source.SMTP, Envelope(sender, rcpt), raw)
    case = Case("c0ffee000001", "ticketnest", state, time.time(), "0a1b2c3d", message)
    return replace(case, **fields)  # type: ignore[arg-type]


def with_message(case: Case, **fields: object) -> Case:
    """`case` carrying its message with `fields` changed (its envelope or bytes)."""
    return replace(case, message=replace(case.message, **fields))  # type: ignore[arg-type]


def inputs(ctx: Context, case: Case, target: Case | None = None, dkim_domains: tuple[str, ...] = (),
           staff_auth: str = "none") -> Inputs:
    site = ctx.config.site(case.site)
    assert site is not None
    parsed = parse(case.message.raw, case.message.envelope.mail_from)
    # as the runner loads them, here for every state: a stage that has no use for the target's message ignores it
    target_parsed = parse(target.message.raw, target.message.envelope.mail_from) if target else None
    return Inputs(case, replace(site, staff_auth=staff_auth), parsed, target, time.time(), dkim_domains,
                  target_parsed=target_parsed)


def open_case(ctx: Context) -> Case:
    """A case as it waits for staff: classified, with its contact details."""
    raw = customer_mail("Lost tickets", "Order 4711 is lost")
    outcome = classify.handle(inputs(ctx, case_of(raw)), ctx)
    assert outcome.updates is not None
    return replace(outcome.updates, state=CaseState.OPEN)


def forward_of(ctx: Context, case: Case, staff: str = STAFF) -> OutgoingMail:
    mails = forward.new_case(inputs(ctx, replace(case, state=CaseState.NEW)), ctx).mails
    return next(m for m in mails if m.recipients == (staff,))


def reply_to(ctx: Context, case: Case, text: str, sender: str = STAFF, forwarded_to: str = "",
             headers: bytes = b"") -> Case:
    """The staff reply (from `sender`, to the forward `forwarded_to` got, default the sender's or the
    first staff address's), classified: state STAFF_REPLY with its target set; `headers` go on top."""
    from email import message_from_bytes
    from email import policy

    staff = forwarded_to or (sender if sender in (STAFF, STAFF2) else STAFF)
    forward_mail = message_from_bytes(forward_of(ctx, case, staff).message, policy=policy.default)
    raw = headers + staff_reply(forward_mail, text, sender=sender)  # type: ignore[arg-type]
    rcpt = forward_mail["Reply-To"].addresses[0].addr_spec
    outcome = classify.handle(inputs(ctx, case_of(raw, sender=sender, rcpt=rcpt)), ctx)
    assert outcome.state is CaseState.STAFF_REPLY and outcome.updates is not None
    return outcome.updates


def command(ctx: Context, case: Case, text: str, sender: str = STAFF) -> Outcome:
    """What a verified staff reply starting with `text` does: relay_answer hands it to stage COMMAND."""
    reply = replace(reply_to(ctx, case, text, sender=sender), state=CaseState.VERIFIED)
    relayed = relay_answer.handle(inputs(ctx, reply, target=case), ctx)
    assert (relayed.state, relayed.mails, relayed.target_state) == (CaseState.COMMAND, (), None)
    return commands.handle(inputs(ctx, replace(reply, state=CaseState.COMMAND), target=case), ctx)


def message(mail: OutgoingMail) -> EmailMessage:
    return message_from_bytes(mail.message, policy=policy.default)  # type: ignore[return-value]
