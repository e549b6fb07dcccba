"""Asks rspamd (spam.rspamd_url) about each inbound customer message before the intake takes it.

The message goes to rspamd's HTTP protocol (POST /checkv2) with what rspamd cannot see in it: for
SMTP the envelope (From, Rcpt), the client address (IP), its HELO and its forward-confirmed
reverse DNS name (Hostname; without one rspamd scores RDNS_NONE). Mail read over IMAP passes only
Rcpt: the delivering server's address and the envelope sender are in its Received and Return-Path
headers, where rspamd finds them. A contact form post is checked as a message of its fields, sent
as an authenticated submission (`User`): the browser's address is no mail server whose SPF, DMARC
or blocklist entries would mean anything, and the form keeps that address to its rate limits.

rspamd's action decides (SpamVerdict.result): reject and discard -> "reject"; soft reject and
greylist -> "greylist"; no action -> "ham"; add header, rewrite subject and any other -> "suspect".
rspamd down, slow (spam.timeout) or failing -> "unavailable": the mail is taken, marked unchecked.
Each check is counted; the unavailable ones are logged at most once a minute, with a count. Nothing
from the mail or its sender is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from aiosmtpd.smtp import Session
from email_validator import EmailNotValidError, validate_email

from careservice import metrics
from careservice.mail import Draft, new_message_id, render
from careservice.model import ContactDetails
from careservice.settings import Site, SpamConfig
from careservice.spamverdict import SKIPPED, SpamVerdict

log = logging.getLogger("careservice.spam")

REPLY_SPAM = "550 5.7.1 Message refused as spam"
REPLY_GREYLIST = "451 4.7.1 Message deferred, please try again later"
ACTIONS = {"reject": "reject", "discard": "reject", "soft reject": "greylist", "greylist": "greylist",
           "no action": "ham"}
SPF = {"R_SPF_ALLOW": "pass", "R_SPF_FAIL": "fail", "R_SPF_SOFTFAIL": "softfail", "R_SPF_NEUTRAL": "neutral",
       "R_SPF_NA": "none", "R_SPF_DNSFAIL": "temperror", "R_SPF_PERMFAIL": "permerror"}
DMARC = {"DMARC_POLICY_ALLOW": "pass", "DMARC_POLICY_REJECT": "fail", "DMARC_POLICY_QUARANTINE": "fail",
         "DMARC_POLICY_SOFTFAIL": "fail", "DMARC_NA": "none", "DMARC_DNSFAIL": "temperror",
         "DMARC_BAD_POLICY": "permerror"}
FORM_USER = "contact-form"
LOG_INTERVAL = 60.0
RDNS_SHARE = 0.2  # of spam.timeout, for the client's reverse DNS name (on its own clock: a slow resolver is no outage)
RDNS_THREADS = 4  # lookups that hang must not take the loop's default executor, which the intake shares
BATCH_CONCURRENCY = 4  # checks of one IMAP batch at a time: rspamd must answer each within spam.timeout


@dataclass(frozen=True)
class Probe:
    """What rspamd is told besides the message ("" / () = not told)."""

    recipients: tuple[str, ...]
    sender: str | None = None  # the envelope sender; "" is the null sender
    ip: str = ""
    helo: str = ""
    hostname: str = ""
    user: str = ""


class Unavailable(Exception):
    """rspamd gave no verdict; `reason` is the code logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SpamCheck:
    """The rspamd client of one process; checks give SKIPPED when spam.rspamd_url is empty."""

    def __init__(self, config: SpamConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.url = config.rspamd_url.rstrip("/") + "/checkv2"
        self.clock = clock
        # trust_env off: an HTTP(S)_PROXY in the service's environment must not receive the mail
        self._client = httpx.AsyncClient(timeout=config.timeout, trust_env=False) if config.rspamd_url else None
        self._resolver = ThreadPoolExecutor(RDNS_THREADS, "rdns") if config.rspamd_url else None
        self._unlogged = 0
        self._logged_at = -LOG_INTERVAL

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._resolver is not None:
            self._resolver.shutdown(wait=False, cancel_futures=True)

    @property
    def enabled(self) -> bool:
        """False without spam.rspamd_url: every check is SKIPPED."""
        return self._client is not None

    async def check(self, raw: bytes, probe: Probe) -> SpamVerdict:
        """rspamd's verdict on `raw`; "unavailable" when rspamd gave none (counted, logged once a minute)."""
        if not self.enabled:
            return SKIPPED
        try:
            async with asyncio.timeout(self.config.timeout):
                reply = await self._client.post(self.url, content=raw, headers=_headers(probe))
            if reply.status_code != 200:
                raise Unavailable(f"http_{reply.status_code}")
            verdict = _verdict(reply.content)
        except (TimeoutError, httpx.TimeoutException):
            verdict = self._unavailable("timeout")
        except httpx.HTTPError:
            verdict = self._unavailable("unreachable")
        except Unavailable as problem:
            verdict = self._unavailable(problem.reason)
        metrics.spam_check(verdict.result)
        return verdict

    async def check_all(self, raws: list[bytes], probe: Probe) -> list[SpamVerdict]:
        """The verdicts of `raws` in order, a few checks at a time."""
        limit = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(raw: bytes) -> SpamVerdict:
            async with limit:
                return await self.check(raw, probe)

        return list(await asyncio.gather(*(one(raw) for raw in raws)))

    async def smtp_probe(self, session: Session, sender: str, recipients: list[str]) -> Probe:
        """The probe of an SMTP transaction from the client of `session`."""
        ip = str(session.peer[0]) if isinstance(session.peer, tuple) else ""
        return Probe(tuple(recipients), sender, ip, session.host_name or "", await self._client_name(ip))

    async def _client_name(self, ip: str) -> str:
        """The client's reverse DNS name if it resolves back to `ip`, else ""."""
        if not ip or self._resolver is None:
            return ""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.timeout * RDNS_SHARE):
                name, _ = await loop.run_in_executor(self._resolver, socket.getnameinfo, (ip, 0), socket.NI_NAMEREQD)
                infos = await loop.run_in_executor(self._resolver, socket.getaddrinfo, name, None)
        except (OSError, TimeoutError, UnicodeError):
            return ""
        return name if any(info[4][0] == ip for info in infos) else ""

    def _unavailable(self, reason: str) -> SpamVerdict:
        self._unlogged += 1
        now = self.clock()
        if now - self._logged_at >= LOG_INTERVAL:
            log.warning("spam_check_unavailable reason=%s count=%d (mail taken unchecked)", reason, self._unlogged)
            self._logged_at, self._unlogged = now, 0
        return SpamVerdict("unavailable")


def _headers(probe: Probe) -> list[tuple[bytes, bytes]]:
    """rspamd's request headers; values are cleaned of control characters, which HTTP cannot carry."""
    fields = [("Rcpt", rcpt) for rcpt in probe.recipients]
    if probe.sender == "":
        fields.append(("From", "<>"))
    elif probe.sender is not None and _parses(probe.sender):
        fields.append(("From", probe.sender))
    fields += [(name, value) for name, value in (("IP", probe.ip), ("Helo", probe.helo),
                                                 ("Hostname", probe.hostname), ("User", probe.user)) if value]
    return [(name.encode(), "".join(c for c in value if c.isprintable()).encode()) for name, value in fields]


def _parses(sender: str) -> bool:
    """Whether rspamd can read `sender`. One it cannot (an SMTPUTF8 address, a quoted or doubly dotted local
    part, a comment) it logs whole at error ("bad from header"), which no log level keeps out: such a
    sender is not told, and rspamd checks the mail as one without an envelope sender (no SPF)."""
    try:  # test_environment: the special-use domain "test" is a name like any other to rspamd
        validate_email(sender, check_deliverability=False, allow_smtputf8=False, globally_deliverable=False,
                       test_environment=True)
    except EmailNotValidError:
        return False
    return True


def _verdict(body: bytes) -> SpamVerdict:
    try:
        reply = json.loads(body)
        action, symbols = reply["action"], reply.get("symbols", {})
    except (ValueError, TypeError, KeyError) as exc:
        raise Unavailable("bad_reply") from exc
    if not isinstance(action, str) or not isinstance(symbols, dict):
        raise Unavailable("bad_reply")
    spf = next((SPF[name] for name in symbols if name in SPF), "unknown")
    dmarc = next((DMARC[name] for name in symbols if name in DMARC), "unknown")
    return SpamVerdict(ACTIONS.get(action, "suspect"), spf, dmarc)


def form_message(site: Site, contact: ContactDetails, query: str, subject: str) -> bytes:
    """A contact form post as the message rspamd checks: every field the customer filled in, then the query."""
    fields = (("Name", contact.name), ("Company", contact.company), ("Address", contact.address),
              ("Telephone", contact.telephone), ("Fax", contact.fax))
    text = "".join(f"{label}: {value}\n" for label, value in fields if value) + "\n" + query
    return render(Draft(from_name=contact.name, from_address=contact.email, to=(site.care_address,),
                        subject=subject, text=text, message_id=new_message_id(site.domain)))


def form_probe(site: Site, email: str) -> Probe:
    return Probe((site.care_address,), email, user=FORM_USER)
