"""What every stage gets besides its case: explicit dependencies, no globals."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from careservice.addresses import Addressing
from careservice.config import Config, Site
from careservice.crypto import Keyring, load_master_key
from careservice.mail import Draft, Parsed, new_message_id, parse, render
from careservice.model import Case, MailKind, OutgoingMail
from careservice.store import Store
from careservice.texts import Texts

PARSE_CACHE = 256


def read_secret(path: str, env: str) -> str:
    """A secret from the environment variable `env`, else from the file `path` ("" if neither)."""
    if env in os.environ:
        return os.environ[env]
    return Path(path).read_text().strip() if path else ""


def build_context(config: Config, intake: bool) -> Context:
    """The store and everything keyed by the master key, as both processes need them.

    Only the intake process creates a missing master key, and only its commits must be on disk
    before they are answered; the worker's store runs inline (see careservice.store).
    """
    keyring = Keyring(load_master_key(config.master_key_file, create=intake))
    store = Store(config.data_dir, keyring, durable=intake, inline=not intake)
    return Context(config, store, Addressing(config.sites, keyring), keyring, Texts(config.templates_dir),
                   time.time)


@dataclass
class Context:
    config: Config
    store: Store
    addressing: Addressing
    keyring: Keyring
    texts: Texts
    clock: Callable[[], float]
    _parsed: OrderedDict[str, Parsed] = field(default_factory=OrderedDict)

    def site(self, case: Case) -> Site:
        site = self.config.site(case.site)
        if site is None:
            raise LookupError(f"case {case.id}: site no longer configured")
        return site

    def parsed(self, case: Case) -> Parsed:
        """The case's message, parsed once (kept in memory for the next stages).

        Parsed in the worker's one thread: the parse is bounded (careservice.mail), and a parse
        thread would hold the GIL while the store's inline transactions hold the write lock."""
        if case.id not in self._parsed:
            self._parsed[case.id] = parse(case.raw, case.envelope.mail_from)
            while len(self._parsed) > PARSE_CACHE:
                self._parsed.popitem(last=False)
        return self._parsed[case.id]

    def forget(self, case_id: str) -> None:
        self._parsed.pop(case_id, None)

    def outgoing(self, kind: MailKind, case_id: str, sender: str, draft: Draft) -> OutgoingMail:
        """Render `draft` into a queued mail; the recipients are exactly `draft.to`."""
        return OutgoingMail(kind, case_id, sender, draft.to, render(draft), draft.message_id)

    def notice(self, site: Site, case_id: str, key_case_id: str, to: tuple[str, ...], headline: str,
               explanation: str) -> OutgoingMail:
        """A short automatic notice to staff that names a case and nothing else of it."""
        subject, text = self.texts.mail(site.id, "notice", site=site, case_id=case_id, headline=headline,
                                        explanation=explanation)
        draft = Draft(from_name=f"{site.name} careservice", from_address=site.care_address, to=to,
                      subject=subject, text=text, message_id=new_message_id(site.domain), automatic=True,
                      loop_marker=self.config.smtp.hostname)
        return self.outgoing(MailKind.NOTICE, key_case_id, "", draft)
