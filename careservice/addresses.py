"""Our addresses: care addresses, signed reply addresses for staff, signed Message-IDs for customers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from careservice.config import Site
from careservice.crypto import Keyring

_TOKEN = re.compile(r"^([0-9a-f]{12})\.([0-9a-f]{8})\.([a-z2-7]{16})$")
_ACK_ID = re.compile(r"^ack\.([0-9a-f]{12})\.([0-9a-f]{8})\.([a-z2-7]{16})@(.+)$")


@dataclass(frozen=True)
class Recipient:
    site: Site
    token: str  # "" for the care address itself, else the text after "+"


@dataclass(frozen=True)
class ReplyToken:
    case_id: str
    nonce: str  # the case's nonce when issued: a reopened case has a new one (handlers.delivery)
    staff: str  # the staff address it was issued to, the only From it is taken from


class Addressing:
    """Recognises and issues the addresses and ids the service owns."""

    def __init__(self, sites: tuple[Site, ...], keyring: Keyring) -> None:
        self._keyring = keyring
        self.use(sites)

    def use(self, sites: tuple[Site, ...]) -> None:
        """Recognise these sites from now on (a reload)."""
        self._by_domain = {s.domain: s for s in sites}
        # a route's match_recipient is a care address of its site too, at any domain (careservice.config
        # lets each belong to one site only)
        self._routed = {r.match_recipient: s for s in sites for r in s.routes if r.match_recipient}

    def recipient(self, address: str) -> Recipient | None:
        """The site and token for one of our addresses; None for anything else (relay refused)."""
        local, at, domain = address.rpartition("@")
        if not at or not local or local.startswith('"'):
            return None
        routed = self._routed.get(f"{local.lower()}@{domain.lower()}")
        if routed is not None:
            return Recipient(routed, "")
        site = self._by_domain.get(domain.lower())
        if site is None:
            return None
        if f"{local.lower()}@{site.domain}" == site.care_address:
            return Recipient(site, "")
        base, plus, token = local.partition("+")
        if plus and base.lower() == site.care_local and _TOKEN.match(token.lower()):
            return Recipient(site, token.lower())
        return None

    def is_ours(self, address: str) -> bool:
        return self.recipient(address) is not None

    def reply_address(self, site: Site, case_id: str, nonce: str, staff: str) -> str:
        """The Reply-To for the forward of a case to one staff address: it is honoured only from there."""
        mac = self._keyring.sign(_reply_mac_input(site, case_id, nonce, staff))
        return f"{site.care_local}+{case_id}.{nonce}.{mac}@{site.domain}"

    def check_reply_token(self, site: Site, token: str) -> ReplyToken | None:
        """The case and staff address a reply address names, if its MAC is ours for this site and one
        of its current staff addresses (its own or a route's)."""
        m = _TOKEN.match(token)
        if not m:
            return None
        case_id, nonce, mac = m.groups()
        for staff in site.all_staff:
            if self._keyring.verify(_reply_mac_input(site, case_id, nonce, staff), mac):
                return ReplyToken(case_id, nonce, staff)
        return None

    def ack_message_id(self, site: Site, case_id: str, nonce: str) -> str:
        mac = self._keyring.sign(f"customer|{site.id}|{case_id}|{nonce}".encode())
        return f"ack.{case_id}.{nonce}.{mac}@{site.domain}"

    def forward_message_id(self, site: Site, case_id: str, staff: str) -> str:
        """The Message-ID of the first forward of a case to one staff address: derived, so later mail about
        the case threads to it without anything stored. Each staff member's copy has its own (a client may
        drop a second message with an id it holds); the nonce is left out, as a reopened case keeps its thread."""
        mac = self._keyring.sign(f"forward|{site.id}|{case_id}|{staff.lower()}".encode())
        return f"case.{case_id}.{mac}@{site.domain}"

    def followed_case(self, site: Site, references: tuple[str, ...]) -> str:
        """The case id of a signed acknowledgement this message refers to, or ""."""
        for ref in references:
            m = _ACK_ID.match(ref)
            if m and m.group(4) == site.domain:
                case_id, nonce, mac = m.group(1), m.group(2), m.group(3)
                if self._keyring.verify(f"customer|{site.id}|{case_id}|{nonce}".encode(), mac):
                    return case_id
        return ""


def _reply_mac_input(site: Site, case_id: str, nonce: str, staff: str) -> bytes:
    return f"staff|{site.id}|{case_id}|{nonce}|{staff.lower()}".encode()
