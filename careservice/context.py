"""What every stage gets: its inputs (loaded by the runner) and the shared tools; explicit, no globals."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from careservice.addresses import Addressing
from careservice.config import Config, Site
from careservice.crypto import Keyring
from careservice.mail import Draft, Parsed, new_message_id, render
from careservice.model import Case, MailKind, OutgoingMail
from careservice.texts import NOTICE_FOLDER, Texts


@dataclass(frozen=True)
class Inputs:
    """Everything a stage decides from, loaded by the runner: stages do no I/O of their own."""

    case: Case
    site: Site
    parsed: Parsed  # the case's message
    target: Case | None  # the stored case `case.target` names (a follow-up's or staff reply's), None if gone
    now: float
    # The d= domains of the message's valid DKIM signatures; verified by the runner (DNS) only for a
    # staff reply of a site with staff_auth "dkim", else empty (careservice.staffauth)
    dkim_domains: tuple[str, ...] = ()
    blocked: bool = False  # RECEIVED: its sender is marked "#spam" (spam.block_days not yet passed)
    # NEW at a site with a round robin: each route's turn ("" the site's own), read from the store
    turns: Mapping[str, int] = field(default_factory=dict)
    # `target`'s message, parsed by the runner for the states in handlers.READS_TARGET, else None
    target_parsed: Parsed | None = None


@dataclass
class Context:
    """The tools every stage and adapter shares: config, addresses and tokens, digests, texts, clock.
    Nothing here does I/O once built (the texts are read when first used)."""

    config: Config
    addressing: Addressing
    keyring: Keyring
    texts: Texts
    clock: Callable[[], float]

    def site(self, case: Case) -> Site:
        site = self.config.site(case.site)
        if site is None:
            raise LookupError(f"case {case.id}: site no longer configured")
        return site

    def outgoing(self, kind: MailKind, case_id: str, sender: str, draft: Draft) -> OutgoingMail:
        """Render `draft` into a queued mail; the recipients are exactly `draft.to`."""
        return OutgoingMail(kind, case_id, sender, draft.to, render(draft), draft.message_id)

    def notice(self, site: Site, to: tuple[str, ...], key: str, *, about: str, filed_under: str, reply_to: str = "",
               answers: Parsed | None = None, **values: object) -> OutgoingMail:
        """A short automatic notice to staff that names a case (`about`, "" for none) and nothing else of
        it; it is queued under the case `filed_under`, whose key encrypts it and whose purge removes it.
        Its words are mail/<language>/notices/<key>.txt (careservice.texts.NOTICES) in the site's language,
        given `values` (ids, staff names, numbers: never the customer's).
        A `reply_to` (a reply address of one staff member) makes it answerable for the case. A notice
        that `answers` a staff member's reply is threaded to it."""
        subject, text = self.texts.mail(site.id, f"{NOTICE_FOLDER}{key}", site=site, case_id=about or "-", **values)
        draft = Draft(from_name=f"{site.name} careservice", from_address=site.care_address, to=to,
                      subject=subject, text=text, message_id=new_message_id(site.domain), automatic=True,
                      reply_to=reply_to, loop_marker=self.config.smtp.hostname,
                      in_reply_to=answers.message_id if answers else "",
                      references=answers.references if answers else ())
        return self.outgoing(MailKind.NOTICE, filed_under, "", draft)
