"""What `check` verifies and `run` insists on: everything the config points at, before it costs a mail.

Loading the config (careservice.config) proves its syntax and values; these checks touch the
files and sockets it names: templates that render for every site, a master key that is readable
and private, TLS files that load, secrets that can be read, listeners that do not collide.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from careservice.config import RELAY_PASSWORD_ENV, Config, ConfigError
from careservice.crypto import MasterKeyError, load_master_key, master_key_from_env
from careservice.dkim import site_key
from careservice.texts import TemplateProblem, Texts
from careservice.tlsconf import client_context, server_context

WILDCARDS = {"", "0.0.0.0", "::"}


def problems(config: Config) -> list[str]:
    """Every problem found, each as `key: problem`; empty when `run` can start."""
    found = []
    for check in (_templates, _master_key, _listeners, _tls, _secrets, _dkim_keys, _admin_token, _data_dir, _spam):
        try:
            found.extend(check(config))
        except ConfigError as exc:
            found.append(str(exc))
    return found


def _templates(config: Config) -> Iterator[str]:
    if config.templates_dir is not None and not config.templates_dir.is_dir():
        yield f"service.templates_dir: not a directory: {config.templates_dir}"
        return
    try:
        texts = Texts(config.templates_dir, config.sites)
    except TemplateProblem as exc:
        yield f"templates: {exc}"
        return
    for path in texts.stray():
        yield (f"service.templates_dir: {path} is never used: texts live in <kind>/<language>/<name>, a site's "
               "own in <kind>/<language>/<site id>/<name>")
    for i, site in enumerate(config.sites):
        if site.language not in texts.languages:
            known = ", ".join(sorted(texts.languages))
            yield f'sites[{i}].language: no texts in "{site.language}" (there are: {known})'
        for problem in texts.check(site):  # in every language
            yield f"templates: site {site.id}: {problem.path}: {str(problem).split(': ', 1)[1]}"


def _master_key(config: Config) -> Iterator[str]:
    path = config.master_key_file
    if master_key_from_env() is None and path.resolve().is_relative_to(config.data_dir.resolve()):
        yield (f"security.master_key_file: {path} is inside service.data_dir: a copy of data_dir would hold "
               "the key that opens it; keep it beside the config")
        return
    if master_key_from_env() is None and not path.exists():
        if not os.access(_existing_parent(path), os.W_OK):
            yield f"security.master_key_file: {path} is missing and its folder is not writable"
        return  # `run` creates it
    try:
        load_master_key(path, create=False)
    except MasterKeyError as exc:
        yield str(exc)


def _listeners(config: Config) -> Iterator[str]:
    listeners = [("smtp.listen", config.smtp.listen), ("web.listen", config.web.listen)]
    if config.admin.listen is not None:
        listeners.append(("admin.listen", config.admin.listen))
    for i, (key, endpoint) in enumerate(listeners):
        for other_key, other in listeners[:i]:
            if endpoint.port == other.port and (endpoint.host == other.host or {endpoint.host, other.host} & WILDCARDS):
                yield f"{key}: same address as {other_key} ({endpoint.host}:{endpoint.port})"


def _tls(config: Config) -> Iterator[str]:
    if config.smtp.tls_cert:
        yield from _loads("smtp.tls_cert", lambda: server_context(config.smtp.tls_cert, config.smtp.tls_key))
    try:
        check_web_tls(config)
    except ConfigError as exc:
        yield str(exc)
    if config.relay.ca_file:
        yield from _loads("relay.ca_file", lambda: client_context(config.relay.ca_file))


def _loads(key: str, load: Callable[[], object]) -> Iterator[str]:
    try:
        load()
    except (OSError, ssl.SSLError, ValueError) as exc:
        yield f"{key}: does not load: {getattr(exc, 'strerror', None) or exc}"


def _secrets(config: Config) -> Iterator[str]:
    files = {} if RELAY_PASSWORD_ENV in os.environ else {"relay.password_file": config.relay.password_file}
    files.update({f"imap[{i}].password_file": box.password_file for i, box in enumerate(config.imap)})
    accounts = [("relay", config.relay.oauth2), *((f"imap[{i}]", box.oauth2) for i, box in enumerate(config.imap))]
    for table, oauth2 in accounts:
        if oauth2 is not None:
            files[f"{table}.client_secret_file"] = oauth2.client_secret_file
            files[f"{table}.refresh_token_file"] = oauth2.refresh_token_file
            folder = Path(oauth2.refresh_token_file).parent
            if oauth2.refresh_token_file and not os.access(folder, os.W_OK):  # a rotated token is written beside it
                yield f"{table}.refresh_token_file: its folder {folder} is not writable"
    for key, name in files.items():
        if name and not os.access(name, os.R_OK):
            yield f"{key}: cannot read {name}"


def _dkim_keys(config: Config) -> Iterator[str]:
    for i, site in enumerate(config.sites):
        try:
            site_key(i, site)
        except ConfigError as exc:
            yield str(exc)


def _admin_token(config: Config) -> Iterator[str]:
    if config.admin.listen is not None:
        try:
            admin_token(config)
        except ConfigError as exc:
            yield str(exc)


def admin_token(config: Config) -> str:
    """The admin listener's bearer token ("" = none asked for); ConfigError naming admin.token_file if unusable."""
    path = config.admin.token_file
    if not path:
        return ""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("admin.token_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ConfigError("admin.token_file", f"{path} is empty")
    return token


def _spam(config: Config) -> Iterator[str]:
    url = config.spam.rspamd_url
    if not url:
        return
    shape = 'expected "http://host:port" or "https://host:port" (rspamd\'s normal worker, e.g. http://127.0.0.1:11333)'
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        port, parts = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        yield f'spam.rspamd_url: {shape}, got "{url}"'
    elif parts.username is not None or parts.query or parts.fragment:
        yield f'spam.rspamd_url: no user, query or fragment: {shape}, got "{url}"'


def _data_dir(config: Config) -> Iterator[str]:
    if not os.access(_existing_parent(config.data_dir), os.W_OK):
        yield f"service.data_dir: {config.data_dir} is not writable"


def _existing_parent(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent (what a mkdir would need)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_web_tls(config: Config) -> None:
    """Load web.tls_cert with web.tls_key as the server will; ConfigError naming web.tls_cert if they do not."""
    web = config.web
    if web.tls_cert is None:
        return
    try:
        server_context(str(web.tls_cert), str(web.tls_key))
    except OSError as exc:  # a missing or unreadable file, or an ssl.SSLError: not PEM, key not the cert's
        raise ConfigError("web.tls_cert", f"cannot load {web.tls_cert} with key {web.tls_key}: {exc}") from None
