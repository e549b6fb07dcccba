"""The configuration as the rest of the code sees it: frozen records, filled in by careservice.config."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Protocol


class ConfigError(Exception):
    """A config problem, phrased as `key: problem`."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


ASSIGN_MODES = ("all", "round_robin")


class Pattern(Protocol):
    """A compiled RE2 pattern (google-re2): matching runs in time linear in the text, whatever the pattern."""

    def search(self, text: str) -> object | None: ...


@dataclass(frozen=True)
class Route:
    """`[[sites.routes]]`: a case whose recipient and subject match goes to `staff` instead of the site's."""

    id: str  # stable across reloads while its match keys stay: sealed in each routed case, keys its turn counter
    match_recipient: str  # "" = any; else an extra care address of the site
    match_subject: Pattern | None  # None = any
    staff: tuple[str, ...]
    assign: str  # "all" or "round_robin"


@dataclass(frozen=True)
class Site:
    id: str
    name: str
    domain: str
    care_address: str
    staff: tuple[str, ...]
    web_hosts: tuple[str, ...]  # host names whose requests for contact_path get this site's form
    contact_path: str
    dkim_selector: str = ""  # with dkim_key_file: mail from this site is signed for its domain
    dkim_key_file: str = ""
    staff_auth: str = "none"  # "none", "dkim" or "authres:<authserv-id>" (careservice.staffauth)
    notify_answered: bool = False  # the other staff hear when one of them answers or closes a case
    routes: tuple[Route, ...] = ()  # the first that matches a new case takes it; none: the site's own staff
    assign: str = "all"  # for cases no route takes, and the default of the site's routes
    language: str = "en"  # the texts of a case whose customer's language has none, and staff's texts

    @property
    def care_local(self) -> str:
        return self.care_address.rsplit("@", 1)[0]

    @property
    def all_staff(self) -> tuple[str, ...]:
        """Every staff address of the site, its own first, then its routes', each once."""
        return tuple(dict.fromkeys((*self.staff, *(a for r in self.routes for a in r.staff))))

    @property
    def rotates(self) -> bool:
        """Whether a new case may take a round robin turn (the runner then loads the turns)."""
        return "round_robin" in (self.assign, *(r.assign for r in self.routes))

    def route(self, route_id: str) -> Route | None:
        """The route of that id; None for "" (no route took the case) or a route no longer configured."""
        return next((r for r in self.routes if route_id and r.id == route_id), None)


@dataclass(frozen=True)
class OAuth2Config:
    """How an IMAP mailbox or the relay gets its XOAUTH2 access tokens (careservice.oauth2)."""

    token_url: str
    client_id: str
    client_secret_file: str  # "" = a public client (refresh_token grant only)
    scope: str  # "" = whatever the refresh token was granted
    grant: str  # "client_credentials" (app-only) or "refresh_token" (delegated)
    refresh_token_file: str  # refresh_token grant: read at each refresh, replaced when the provider rotates it


@dataclass(frozen=True)
class RelayConfig:
    url: str
    scheme: str
    host: str
    port: int
    maildir: Path | None
    retry_delays: tuple[int, ...]
    give_up_after: int
    username: str
    password_file: str
    timeout: float
    connections: int
    ca_file: str  # extra CA bundle to trust for the relay's certificate ("" = system CAs only)
    oauth2: OAuth2Config | None = None  # auth = "oauth2": AUTH XOAUTH2 as `username` instead of a password


@dataclass(frozen=True)
class SmtpConfig:
    listen: Endpoint
    hostname: str
    max_message_bytes: int
    tls_cert: str
    tls_key: str
    require_tls: bool
    min_free_bytes: int
    max_recipients: int
    timeout: int
    max_connections: int = 100
    max_connections_per_client: int = 20  # per IPv4 address or IPv6 /64
    idle_before_mail: int = 30  # seconds a session may go without MAIL (from its start or its last transaction)
    max_bytes_per_sender_per_hour: int = 50_000_000  # per envelope sender, all but signed reply addresses
    reply_min_free_bytes: int = 1  # below min_free_bytes, signed reply addresses are still taken down to this


@dataclass(frozen=True)
class WebConfig:
    listen: Endpoint
    verification: str
    frame_ancestors: str
    code_ttl_seconds: int
    max_posts_per_ip_per_hour: int
    tls_cert: Path | None  # HTTPS on web.listen when set (with tls_key)
    tls_key: Path | None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # whose X-Forwarded-For counts
    header_timeout: int  # seconds a connection has for each request's headers
    max_connections_per_client: int
    max_posts_per_minute: int  # all clients together
    max_audio_codes_per_minute: int  # all clients together


@dataclass(frozen=True)
class AdminConfig:
    listen: Endpoint | None  # None: no admin listener
    token_file: str  # "" = no token asked for


@dataclass(frozen=True)
class StoreConfig:
    url: str = "sqlite:"  # "sqlite:" = the files in data_dir; "postgresql://…" = shared by several nodes
    keys_url: str = ""  # postgresql: the case keys' database, reached as another role
    lease_seconds: int = 60  # postgresql: how long a node's claim on a case, a mail or a mailbox lasts; the
    # config's default is twice relay.timeout, and it must exceed relay.timeout (config._store)

    @property
    def shared(self) -> bool:
        return self.url.startswith("postgresql")


@dataclass(frozen=True)
class SpamConfig:
    rspamd_url: str  # "" = no spam check
    timeout: int  # seconds for one check, after which the mail is taken unchecked
    block_days: int = 30  # a sender a staff member marked "#spam" is discarded this long


@dataclass(frozen=True)
class ImapMailbox:
    site: str
    host: str
    port: int
    security: str
    username: str
    password_file: str
    folder: str
    poll_seconds: int
    quarantine_folder: str
    verify_tls: bool
    oauth2: OAuth2Config | None = None  # auth = "oauth2": XOAUTH2 instead of password_file
    envelope_header: str = "Delivered-To"  # its topmost copy, prepended at final delivery, names the recipient

    @property
    def name(self) -> str:
        return f"{self.username}@{self.host}:{self.port}/{self.folder}"


@dataclass(frozen=True)
class Config:
    path: Path
    data_dir: Path
    templates_dir: Path | None  # an override searched before the packaged templates
    log_level: str
    stop_timeout: int
    worker_memory_mb: int  # the worker's batches are sized to stay under this (careservice.budget)
    master_key_file: Path
    smtp: SmtpConfig
    relay: RelayConfig
    web: WebConfig
    unanswered_days: int
    hard_limit_days: int  # every case is purged at this age, whatever its state or site
    remind_after: tuple[float, ...]  # an open case's age, in seconds, at each reminder to its owner or staff
    acks_per_hour: int
    acks_per_domain_per_hour: int
    acks_per_hour_total: int
    sites: tuple[Site, ...]
    imap: tuple[ImapMailbox, ...] = field(default=())
    admin: AdminConfig = field(default=AdminConfig(None, ""))
    spam: SpamConfig = field(default=SpamConfig("", 5))
    store: StoreConfig = field(default=StoreConfig())
    digest_at: time | None = None  # [digest] at: local time of each site's daily digest to its staff; None = none
    event_loop: str = "uvloop"  # or "asyncio" (the standard library's loop), for both processes
    workers: int = 1  # worker processes, each taking the cases of its shard (SQLite) or its own claims (PostgreSQL)

    def site(self, site_id: str) -> Site | None:
        return next((s for s in self.sites if s.id == site_id), None)
