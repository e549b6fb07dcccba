"""Load config.toml into frozen dataclasses; every error names its key."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import tomllib
from pathlib import Path

from careservice.budget import min_memory_mb
from careservice.configroutes import address, assign, clock_time, extra_addresses, routes, staff
from careservice.configtable import Table
from careservice.language import LANGUAGE
from careservice.settings import (  # the records config.py fills in; importable from here too
    AdminConfig,
    Config,
    ConfigError,
    Endpoint,
    ImapMailbox,
    OAuth2Config,
    RelayConfig,
    Site,
    SmtpConfig,
    SpamConfig,
    StoreConfig,
    WebConfig,
)
from careservice.staffauth import valid_mode

MAX_WORKERS = 16  # service.workers: case ids shard by their last hex digit (careservice.store.cases)
RELAY_SCHEMES = ("smtp", "smtps", "smtp+starttls", "maildir")
IMAP_SECURITY = ("tls", "starttls", "none")
HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 field name: printable ASCII but ":"
AUTH_METHODS = ("password", "oauth2")
OAUTH2_GRANTS = ("client_credentials", "refresh_token")
OAUTH2_KEYS = ("token_url", "client_id", "client_secret_file", "scope", "grant", "refresh_token_file")
RELAY_PASSWORD_ENV = "CARESERVICE_RELAY_PASSWORD"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess folder, read at its first import
DNS_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")  # host names, DKIM selectors
_DURATION = re.compile(r"(\d{1,9})([smhd])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_CONTACT_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+")  # literal segments: no route parameters, query or fragment


def parse_endpoint(key: str, value: str) -> Endpoint:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f'expected "host:port", got "{value}"')
    return Endpoint(host.strip("[]"), int(port))


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def _event_loop(service: Table) -> str:
    """service.event_loop: "uvloop" (the default) or "asyncio", uvloop checked to be installed."""
    name = service.get("event_loop", str, "uvloop")
    if name not in ("asyncio", "uvloop"):
        raise ConfigError("service.event_loop", f'"asyncio" or "uvloop", got "{name}"')
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("service.event_loop", 'uvloop is not installed (pip install uvloop, or set "asyncio")')
    return name


def _relay(t: Table, base: Path) -> RelayConfig:
    url = t.get("url", str, "smtp://127.0.0.1:25")
    scheme, sep, rest = url.partition(":")
    if not sep or scheme not in RELAY_SCHEMES:
        raise ConfigError(t.key("url"), f'unknown scheme "{scheme}" (use one of {", ".join(RELAY_SCHEMES)})')
    maildir, host, port = None, "", 0
    if scheme == "maildir":
        if not rest:
            raise ConfigError(t.key("url"), "maildir: needs a path")
        maildir = _resolve(base, rest)
    else:
        if not rest.startswith("//"):
            raise ConfigError(t.key("url"), f'expected "{scheme}://host:port", got "{url}"')
        hostport = rest[2:].rstrip("/")
        default_port = {"smtps": 465, "smtp+starttls": 587}.get(scheme, 25)
        endpoint = parse_endpoint(t.key("url"), hostport if ":" in hostport else f"{hostport}:{default_port}")
        host, port = endpoint.host, endpoint.port
    username, plaintext_ok = t.get("username", str, ""), t.get("allow_plaintext", bool, False)
    oauth2, password_file = _oauth2(t, base), t.get("password_file", str, "")
    if oauth2 is not None and not username:
        raise ConfigError(t.key("username"), 'needed with auth = "oauth2" (the account the tokens are for)')
    if oauth2 is not None and password_file:
        raise ConfigError(t.key("password_file"), 'not used with auth = "oauth2"')
    if scheme == "smtp" and (username or not _loopback(host)) and not plaintext_ok:
        raise ConfigError(t.key("url"), "smtp:// never uses TLS, so mail (and the relay password) would cross the "
                                        "network in clear: use smtp+starttls:// or smtps://, or set "
                                        "relay.allow_plaintext = true for a relay on a network you trust")
    delays = t.get("retry_delays", list, [60, 300, 600, 1200, 2400, 4020])
    if not delays or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in delays):
        raise ConfigError(t.key("retry_delays"), "expected a non-empty list of positive seconds")
    return RelayConfig(
        url=url, scheme=scheme, host=host, port=port, maildir=maildir, retry_delays=tuple(delays),
        give_up_after=t.positive("give_up_after", 432000), username=username,
        password_file=_path(base, password_file), timeout=float(t.positive("timeout", 60)),
        connections=t.positive("connections", 4), ca_file=_path(base, t.get("ca_file", str, "")), oauth2=oauth2,
    )


def _oauth2(t: Table, base: Path) -> OAuth2Config | None:
    """The table's `auth`: None for "password", else its OAuth2 settings."""
    auth = t.get("auth", str, "password")
    if auth not in AUTH_METHODS:
        raise ConfigError(t.key("auth"), f'expected one of {", ".join(AUTH_METHODS)}, got "{auth}"')
    if auth == "password":
        for name in OAUTH2_KEYS:
            if name in t.data:
                raise ConfigError(t.key(name), 'only with auth = "oauth2"')
        return None
    url = t.get("token_url", str)
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if scheme != "https" and not (scheme == "http" and _loopback(host)):
        raise ConfigError(t.key("token_url"), f'expected an https:// URL (http:// only to loopback), got "{url}"')
    grant = t.get("grant", str)
    if grant not in OAUTH2_GRANTS:
        raise ConfigError(t.key("grant"), f'expected one of {", ".join(OAUTH2_GRANTS)}, got "{grant}"')
    secret, scope = t.get("client_secret_file", str, ""), t.get("scope", str, "")
    refresh = t.get("refresh_token_file", str, "")
    if grant == "client_credentials":
        for name, value in (("client_secret_file", secret), ("scope", scope)):
            if not value:
                raise ConfigError(t.key(name), 'needed with grant = "client_credentials"')
        if refresh:
            raise ConfigError(t.key("refresh_token_file"), 'only with grant = "refresh_token"')
    elif not refresh:
        raise ConfigError(t.key("refresh_token_file"), 'needed with grant = "refresh_token"')
    return OAuth2Config(url, t.get("client_id", str), _path(base, secret), scope, grant, _path(base, refresh))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _site(t: Table, base: Path) -> Site:
    site_id = t.get("id", str)
    if not site_id.isidentifier() and not site_id.replace("-", "").replace(".", "").isalnum():
        raise ConfigError(t.key("id"), f'use letters, digits, "-" or "." only, got "{site_id}"')
    domain = t.get("domain", str).lower()
    care = address(t.key("care_address"), t.get("care_address", str))
    if care.rsplit("@", 1)[1] != domain:
        raise ConfigError(t.key("care_address"), f'must be an address at the site domain "{domain}"')
    if "+" in care.rsplit("@", 1)[0]:
        raise ConfigError(t.key("care_address"), 'must not contain "+" (used for reply addresses)')
    addresses = staff(t)
    hosts = tuple(_web_host(f"{t.key('web_hosts')}[{i}]", h) for i, h in enumerate(t.get("web_hosts", list, [])))
    path = t.get("contact_path", str, "/contact")
    if not _CONTACT_PATH.fullmatch(path):
        raise ConfigError(t.key("contact_path"), f'expected a path such as "/contact.php" (starts with "/"; '
                                                 f'letters, digits, ".", "-", "_", "~" between slashes), got "{path}"')
    selector, key_file = t.get("dkim_selector", str, ""), t.get("dkim_key_file", str, "")
    if bool(selector) != bool(key_file):
        raise ConfigError(t.key("dkim_key_file" if selector else "dkim_selector"),
                          "dkim_selector and dkim_key_file go together")
    if selector and not DNS_NAME.fullmatch(selector):
        raise ConfigError(t.key("dkim_selector"), f'expected a DNS label such as "care2026a" (lower-case letters, '
                                                  f'digits, "-"), got "{selector}"')
    staff_auth = t.get("staff_auth", str, "none")
    if not valid_mode(staff_auth):
        raise ConfigError(t.key("staff_auth"), f'use "none", "dkim" or "authres:<authserv-id>", got "{staff_auth}"')
    language = t.get("language", str, "en")
    if not LANGUAGE.fullmatch(language):
        raise ConfigError(t.key("language"), f'expected a language code such as "en" or "de", got "{language}"')
    assigned = assign(t, "all")
    return Site(site_id, t.get("name", str), domain, care, addresses, hosts, path, selector, _path(base, key_file),
                staff_auth, t.get("notify_answered", bool, False), routes(t, assigned), assigned, language)


def _web_host(key: str, value: object) -> str:
    host = value.lower() if isinstance(value, str) else ""
    if not DNS_NAME.fullmatch(host):
        raise ConfigError(key, f'expected a host name such as "www.example.com" (no scheme, no port), got "{value}"')
    return host


def _networks(t: Table, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for i, value in enumerate(t.get(name, list, [])):
        try:
            networks.append(ipaddress.ip_network(value if isinstance(value, str) else ""))
        except ValueError:
            raise ConfigError(f"{t.key(name)}[{i}]", 'expected an address or network such as "127.0.0.1" or '
                              f'"10.0.0.0/8" (no host bits after the /), got "{value}"') from None
    return tuple(networks)


def _imap(t: Table, site_ids: set[str], base: Path) -> ImapMailbox:
    site = t.get("site", str)
    if site not in site_ids:
        raise ConfigError(t.key("site"), f'unknown site "{site}"')
    security = t.get("security", str, "tls")
    if security not in IMAP_SECURITY:
        raise ConfigError(t.key("security"), f'expected one of {", ".join(IMAP_SECURITY)}, got "{security}"')
    oauth2 = _oauth2(t, base)
    if oauth2 is not None and "password_file" in t.data:
        raise ConfigError(t.key("password_file"), 'not used with auth = "oauth2"')
    envelope_header = t.get("envelope_header", str, "Delivered-To")
    if not HEADER_NAME.fullmatch(envelope_header):
        raise ConfigError(t.key("envelope_header"), 'expected a header name such as "Delivered-To", '
                                                    f'"X-Original-To" or "Envelope-To", got "{envelope_header}"')
    return ImapMailbox(
        site=site, host=t.get("host", str), port=t.positive("port", 993), security=security,
        username=t.get("username", str), password_file=_path(base, t.get("password_file", str)) if oauth2 is None
        else "", folder=t.get("folder", str, "INBOX"), poll_seconds=t.positive("poll_seconds", 60),
        quarantine_folder=t.get("quarantine_folder", str, "careservice-quarantine"),
        verify_tls=t.get("verify_tls", bool, True), oauth2=oauth2, envelope_header=envelope_header,
    )


def load_config(path: Path) -> Config:
    """Read and validate `path`; raise ConfigError naming the first bad key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"not valid TOML: {exc}") from None
    base = path.resolve().parent
    root = Table(data, "")
    service, security, retention = root.sub("service"), root.sub("security"), root.sub("retention")
    admin, spam, acknowledge = root.sub("admin"), root.sub("spam"), root.sub("acknowledge")
    admin_listen = admin.get("listen", str, "127.0.0.1:9025")  # "" = no admin listener
    sites = _sites(root, base)
    log_level = service.get("log_level", str, "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("service.log_level", f'unknown level "{log_level}"')
    templates_dir = service.get("templates_dir", str, "")
    event_loop = _event_loop(service)
    smtp, relay = _smtp(root.sub("smtp"), base), _relay(root.sub("relay"), base)
    unanswered_days = retention.positive("unanswered_days", 30)
    hard_limit_days = retention.positive("hard_limit_days", unanswered_days + 2)
    if hard_limit_days <= unanswered_days:  # the limit catches what expiry missed; it must not come first
        raise ConfigError("retention.hard_limit_days", f"must be more than retention.unanswered_days "
                                                       f"({unanswered_days}), got {hard_limit_days}")
    worker_mb = service.positive("worker_memory_mb", 512)
    max_bytes = smtp.max_message_bytes
    if worker_mb < min_memory_mb(max_bytes):  # the worker must hold one message of the largest size
        raise ConfigError("service.worker_memory_mb", f"must be at least {min_memory_mb(max_bytes)} with "
                                                      f"smtp.max_message_bytes = {max_bytes}, got {worker_mb}")
    config = Config(
        path=path,
        data_dir=_resolve(base, service.get("data_dir", str, "var")),
        templates_dir=_resolve(base, templates_dir) if templates_dir else None,
        log_level=log_level,
        stop_timeout=service.positive("stop_timeout", 30),
        worker_memory_mb=worker_mb,
        workers=service.within("workers", 1, 1, MAX_WORKERS),
        master_key_file=_resolve(base, security.get("master_key_file", str, "master.key")),
        smtp=smtp,
        relay=relay,
        web=_web(root.sub("web"), base),
        unanswered_days=unanswered_days,
        hard_limit_days=hard_limit_days,
        remind_after=_durations(retention, "remind_after", ["24h", "72h"]),
        acks_per_hour=acknowledge.positive("max_per_address_per_hour", 5),
        acks_per_domain_per_hour=acknowledge.positive("max_per_domain_per_hour", 20),
        acks_per_hour_total=acknowledge.positive("max_per_hour", 200),
        event_loop=event_loop,
        sites=sites,
        imap=tuple(_imap(t, {s.id for s in sites}, base) for t in root.array("imap")),
        admin=AdminConfig(parse_endpoint("admin.listen", admin_listen) if admin_listen else None,
                          _path(base, admin.get("token_file", str, ""))),
        spam=SpamConfig(spam.get("rspamd_url", str, ""), spam.positive("timeout", 5), spam.positive("block_days", 30)),
        store=_store(root.sub("store"), relay),
        digest_at=clock_time(root.sub("digest"), "at"),
    )
    root.refuse_unknown()
    return config


def _sites(root: Table, base: Path) -> tuple[Site, ...]:
    site_tables = root.array("sites", required=True)
    if not site_tables:
        raise ConfigError("sites", "at least one [[sites]] table is needed")
    sites = tuple(_site(t, base) for t in site_tables)
    ids = [s.id for s in sites]
    for i, site_id in enumerate(ids):
        if ids.index(site_id) != i:
            raise ConfigError(f"sites[{i}].id", f'duplicate site id "{site_id}"')
    host_keys: dict[str, str] = {}
    for i, site in enumerate(sites):
        for j, host in enumerate(site.web_hosts):
            where = f"sites[{i}].web_hosts[{j}]"
            if host in host_keys:
                raise ConfigError(where, f'"{host}" is also {host_keys[host]}; a host name belongs to one site only')
            host_keys[host] = where
    extra_addresses(sites)
    return sites


def _tls_pair(t: Table) -> tuple[str, str]:
    cert, key = t.get("tls_cert", str, ""), t.get("tls_key", str, "")
    if bool(cert) != bool(key):
        raise ConfigError(t.key("tls_key" if cert else "tls_cert"), "tls_cert and tls_key go together")
    return cert, key


def _smtp(smtp: Table, base: Path) -> SmtpConfig:
    cert, key = _tls_pair(smtp)
    require_tls = smtp.get("require_tls", bool, False)
    if require_tls and not cert:
        raise ConfigError("smtp.require_tls", "needs smtp.tls_cert and smtp.tls_key")
    max_bytes = smtp.positive("max_message_bytes", 10_000_000)
    min_free = smtp.positive("min_free_bytes", max_bytes * 3 // 2)
    reply_min_free = smtp.positive("reply_min_free_bytes", max(1, min_free // 3))
    if reply_min_free > min_free:
        raise ConfigError("smtp.reply_min_free_bytes", f"must not exceed smtp.min_free_bytes ({min_free})")
    sender_quota = smtp.positive("max_bytes_per_sender_per_hour", max(50_000_000, max_bytes))
    if sender_quota < max_bytes:
        raise ConfigError("smtp.max_bytes_per_sender_per_hour",
                          f"must be at least smtp.max_message_bytes ({max_bytes})")
    return SmtpConfig(
        listen=parse_endpoint("smtp.listen", smtp.get("listen", str, "127.0.0.1:2525")),
        hostname=smtp.get("hostname", str, "careservice.localhost"),
        max_message_bytes=max_bytes, tls_cert=_path(base, cert), tls_key=_path(base, key),
        require_tls=require_tls,
        min_free_bytes=min_free,
        max_recipients=smtp.positive("max_recipients", 20),
        timeout=smtp.positive("timeout", 300),
        max_connections=smtp.positive("max_connections", 100),
        max_connections_per_client=smtp.positive("max_connections_per_client", 20),
        idle_before_mail=smtp.positive("idle_before_mail", 30),
        max_bytes_per_sender_per_hour=sender_quota,
        reply_min_free_bytes=reply_min_free,
    )


def _web(web: Table, base: Path) -> WebConfig:
    cert, key = _tls_pair(web)
    verification = web.get("verification", str, "image")
    if verification not in ("image", "off"):
        raise ConfigError("web.verification", f'expected "image" or "off", got "{verification}"')
    return WebConfig(
        listen=parse_endpoint("web.listen", web.get("listen", str, "127.0.0.1:8025")),
        verification=verification,
        frame_ancestors=web.get("frame_ancestors", str, "'none'"),
        code_ttl_seconds=web.positive("code_ttl_seconds", 900),
        max_posts_per_ip_per_hour=web.positive("max_posts_per_ip_per_hour", 20),
        tls_cert=_resolve(base, cert) if cert else None,
        tls_key=_resolve(base, key) if key else None,
        trusted_proxies=_networks(web, "trusted_proxies"),
        header_timeout=web.positive("header_timeout", 20),
        max_connections_per_client=web.positive("max_connections_per_client", 20),
        max_posts_per_minute=web.positive("max_posts_per_minute", 60),
        max_audio_codes_per_minute=web.positive("max_audio_codes_per_minute", 30),
    )


def _store(t: Table, relay: RelayConfig) -> StoreConfig:
    url, keys_url = t.get("url", str, "sqlite:"), t.get("keys_url", str, "")
    if url != "sqlite:" and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("store.url", f'expected "sqlite:" or "postgresql://…", got "{url.split("://")[0]}…"')
    if url != "sqlite:" and not keys_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("store.keys_url", "a postgresql:// URL of the keys database is needed with a PostgreSQL "
                                            "store (another database, reached as another role)")
    if url == "sqlite:" and keys_url:
        raise ConfigError("store.keys_url", 'only with a PostgreSQL store.url (SQLite keeps keys.db in data_dir)')
    if keys_url and keys_url == url:
        raise ConfigError("store.keys_url", "must name another database than store.url")
    lease = t.positive("lease_seconds", 2 * int(relay.timeout))
    # a claim that runs out mid-send lets another node take the mail and send it again (SQLite claims nothing)
    if url != "sqlite:" and lease <= relay.timeout:
        raise ConfigError(t.key("lease_seconds"), f"must be more than relay.timeout ({relay.timeout:g}) with a "
                                                  f"PostgreSQL store, or a node whose claim runs out mid-send lets "
                                                  f"another send the same mail again; got {lease}")
    return StoreConfig(url.replace("postgres://", "postgresql://", 1), keys_url, lease)


def _durations(table: Table, name: str, default: list[str]) -> tuple[float, ...]:
    """A list of durations such as "30s", "4h", "2d", as seconds in ascending order."""
    values = table.get(name, list, default)
    seconds = []
    for i, value in enumerate(values):
        found = _DURATION.fullmatch(value) if isinstance(value, str) else None
        if found is None or int(found.group(1)) == 0:
            raise ConfigError(f"{table.key(name)}[{i}]",
                              f'expected a duration such as "30s", "4h" or "2d", got {value!r}')
        seconds.append(int(found.group(1)) * _UNIT_SECONDS[found.group(2)])
    return tuple(sorted(set(seconds)))


def _path(base: Path, value: str) -> str:
    """A file setting resolved against the config's folder ("" stays unset)."""
    return str(_resolve(base, value)) if value else ""
