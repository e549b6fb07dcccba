"""Typed records passed between intake, stages, store and outbox. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class CaseState(StrEnum):
    RECEIVED = "received"  # an inbound message, not yet classified
    NEW = "new"  # a customer's first message: forward it to staff
    ACKNOWLEDGE = "acknowledge"  # forwarded: acknowledge the customer
    FOLLOW_UP = "follow_up"  # a customer's reply to an open case: forwarded under that case, then dropped
    STAFF_REPLY = "staff_reply"  # mail to a reply address: verify sender and token
    VERIFIED = "verified"  # a genuine staff answer: relay it (or close the case on #closed)
    COMMAND = "command"  # a genuine staff reply whose first line is a "#" command
    OPEN = "open"  # forwarded, waiting for staff; expires after retention.unanswered_days
    ANSWERING = "answering"  # answer queued for the relay; purged on the relay's 250
    PURGED = "purged"  # terminal: rows and key deleted


class MailKind(StrEnum):
    FORWARD = "forward"  # case to staff
    ACK = "ack"  # acknowledgement to the customer
    ANSWER = "answer"  # staff answer to the customer; its 250 purges the case
    NOTICE = "notice"  # short notice to staff (case id only)
    NOTE = "note"  # a staff member's internal note to the case's other staff


class Source(StrEnum):
    SMTP = "smtp"
    IMAP = "imap"
    WEB = "web"


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    rcpt: str  # the one of our addresses this copy was delivered to


@dataclass(frozen=True)
class ContactDetails:
    """What the customer told us about themselves (form fields, or the From header of a mail)."""

    name: str
    email: str
    address: str = ""
    telephone: str = ""
    fax: str = ""
    company: str = ""
    preferred_contact: str = "email"


@dataclass(frozen=True)
class Inbound:
    """A message as it arrived: how, its envelope and its bytes. Stored sealed, never changed; what the
    workflow learns from it (contact, subject, target, ...) lives on the Case that carries it."""

    source: Source
    envelope: Envelope
    raw: bytes


@dataclass(frozen=True)
class Case:
    """One stored item: an inbound message and what the workflow made of it. A customer's first message
    becomes the case itself (NEW to ANSWERING); a follow-up or staff reply points at one (`target`) and
    is dropped once handled."""

    id: str
    site: str
    state: CaseState
    created: float
    nonce: str
    message: Inbound
    contact: ContactDetails | None = None
    subject: str = ""
    message_id: str = ""
    references: tuple[str, ...] = ()
    target: str = ""  # for FOLLOW_UP / STAFF_REPLY: the case it refers to
    failures: int = 0  # stage failures in a row; above 0 the case is held back and counted as stuck
    owner: str = ""  # the staff address "#assign" handed the case to (sealed in the meta, purged with it)
    reminded: int = 0  # reminders sent for this open case (retention.remind_after)
    route: str = ""  # the id of the [[sites.routes]] that took the case ("" = none: the site's staff)
    language: str = ""  # the customer's texts (careservice.texts); "" = the site's (sealed in the meta, purged with it)


@dataclass(frozen=True)
class OutgoingMail:
    kind: MailKind
    case_id: str  # the case whose key encrypts it and whose purge removes it
    sender: str  # envelope MAIL FROM ("" = null sender)
    recipients: tuple[str, ...]
    message: bytes
    message_id: str
    # an answer: who works its case (careservice.routing), so the relay's event tells the case's staff; sealed
    # with the queued mail, purged with it
    route: str = ""
    owner: str = ""


@dataclass(frozen=True)
class Outcome:
    """What a stage decided: the case's next state, a reason code, and mail to queue.

    `updates` replaces the stored case (e.g. parsed contact details); `target_state` moves
    the case named by `case.target` (a staff answer sets it ANSWERING or PURGED).
    """

    state: CaseState
    reason: str
    mails: tuple[OutgoingMail, ...] = ()
    updates: Case | None = None
    target_state: CaseState | None = None
    counters: tuple[str, ...] = field(default=())
    ack_slot: AckSlot | None = None  # the acknowledgement among `mails` goes only if this slot is free
    nonce: str = ""  # the case's new nonce when an answer failed: the reply addresses issued before stop verifying
    block: SenderBlock | None = None  # a sender marked "#spam": its mail is discarded until then
    target_owner: str = ""  # "#assign": the staff address the case named by `case.target` now belongs to
    turn: Turn | None = None  # round robin: the turn this case took, advanced with the forward


@dataclass(frozen=True)
class Turn:
    """A round robin's counter (per site and route, "" for the site's own staff) moving on from `seen`,
    the value the stage chose by; another writer moved it first, the outcome is not applied."""

    route: str
    seen: int


@dataclass(frozen=True)
class OpenCase:
    """What the daily digest lists of an open case: no customer data."""

    id: str
    created: float
    nonce: str
    owner: str
    route: str


@dataclass(frozen=True)
class SenderBlock:
    """Senders (as Keyring.block_digest digests) whose mail is discarded, unacknowledged, until `until`."""

    digests: tuple[bytes, ...]
    until: float


@dataclass(frozen=True)
class AckSlot:
    """One acknowledgement counted against hourly limits (each a keyed digest and its limit: the address,
    its domain, everything), in the same transaction as the outcome: over any of them, the
    acknowledgement is not queued and counts as suppressed."""

    limits: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True)
class NewMessage:
    """An inbound message as intake hands it over."""

    site: str
    source: Source
    envelope: Envelope
    raw: bytes
    contact: ContactDetails | None = None
    dedupe: bytes = b""  # keyed digest; a second message with the same digest is not stored


@dataclass(frozen=True)
class QueuedMail:
    """A mail in the outbox, as the store hands it to the relay."""

    id: int
    site: str
    attempts: int
    created: float
    mail: OutgoingMail


class MailEvent(StrEnum):
    """What the relay said about a mail, where the workflow decides what follows (handlers.EVENTS)."""

    ANSWER_DELIVERED = "answer_delivered"
    ANSWER_FAILED = "answer_failed"


@dataclass(frozen=True)
class DeliveryFailure:
    """Why the outbox dropped a mail, as it hands ANSWER_FAILED the facts: refused for good (a `code`, no
    `gave_up_after`), or given up after `gave_up_after` seconds, the last attempt refused for now (its
    `code`) or the relay not reached (no `code`). The two fields tell the three apart; a third saying which
    could only disagree with them."""

    code: int | None  # the relay's reply code to the last attempt; None when the relay was not reached
    gave_up_after: int | None  # seconds of retries (relay.give_up_after); None when refused for good
