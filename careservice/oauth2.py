"""OAuth2 access tokens for SASL XOAUTH2 (IMAP mailboxes, the relay), from the provider's token endpoint.

A token is kept until shortly before it expires (60 s, or a tenth of its life when that is shorter)
and then fetched again, by one caller at a time per account: the others wait for its result. With
the refresh_token grant the refresh token is read from its file at each refresh, under a lock on its
folder that the daemon's two processes share, and a new one the provider hands out (rotation) replaces
it atomically, so that the next refresh, in either process or after a restart, uses the newest.

`invalid_grant` and `invalid_client` mean that only a person can help (a revoked consent, an expired
secret): after one, the source asks the provider nothing more until `reset()` (a reload) or a restart.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from careservice.settings import OAuth2Config

log = logging.getLogger("careservice.oauth2")

FINAL = ("invalid_grant", "invalid_client")
TIMEOUT = 15.0
RENEW_BEFORE = 60.0  # seconds before expiry, or RENEW_SHARE of the token's life when that is shorter
RENEW_SHARE = 0.1
MAX_ANSWER = 64 * 1024
_CODE = re.compile(r"[a-z_]{1,40}")  # an RFC 6749 error code; anything else is not logged


class OAuth2Error(Exception):
    """No token: `code` is one of FINAL, "secret_unreadable" or "token_failed"; `log_detail` says more
    without quoting the provider (whose text may name the account)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code)
        self.code = code
        self.log_detail = f"problem=oauth2_{code} {detail}"

    @property
    def final(self) -> bool:
        return self.code in FINAL


class TokenSource:
    """The access tokens of one account; `token()` blocks (call it from a thread in async code)."""

    def __init__(self, config: OAuth2Config, account: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.account = account  # for log lines: a mailbox name, or "relay"
        self.clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._renew_at = 0.0  # on `clock`
        self._stopped: OAuth2Error | None = None
        self._unsaved = ""  # a rotated refresh token its file could not take: used until it can

    @property
    def renew_at(self) -> float:
        """When (on `clock`) the current token is replaced: a session that needs a live token ends by then."""
        return self._renew_at

    def token(self) -> str:
        with self._lock:
            if self._stopped is not None:
                raise self._stopped
            if not self._token or self.clock() >= self._renew_at:
                try:
                    self._fetch()
                except OAuth2Error as exc:
                    if exc.final:
                        self._stopped = exc
                        log.error("oauth2_stopped account=%s %s (no new token is asked for until a reload or "
                                  "restart)", self.account, exc.log_detail)
                    raise
            return self._token

    def forget(self) -> None:
        """The server refused the current token: the next `token()` fetches a new one."""
        with self._lock:
            self._token = ""

    def reset(self) -> None:
        """Ask the provider again (a reload: the operator may have fixed the secret or the refresh token)."""
        with self._lock:
            self._stopped, self._token = None, ""

    def _fetch(self) -> None:
        config = self.config
        form = {"grant_type": config.grant, "client_id": config.client_id}
        if config.client_secret_file:
            form["client_secret"] = _read(config.client_secret_file)
        if config.scope:
            form["scope"] = config.scope
        started = self.clock()
        if config.grant == "refresh_token":
            answer = self._refresh(form)
        else:
            answer = _post(config.token_url, form)
        token, lifetime = answer.get("access_token"), answer.get("expires_in", 3600)
        if not isinstance(token, str) or not token or isinstance(lifetime, bool) or not isinstance(lifetime, int):
            raise OAuth2Error("token_failed", "error=bad_answer")
        self._token = token
        self._renew_at = started + lifetime - min(RENEW_BEFORE, lifetime * RENEW_SHARE)

    def _refresh(self, form: dict[str, str]) -> dict[str, object]:
        path = Path(self.config.refresh_token_file)
        try:
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise OAuth2Error("secret_unreadable", f"error={type(exc).__name__}") from None
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # the other process may be refreshing the same token
            current = self._unsaved or _read(str(path))
            answer = _post(self.config.token_url, {**form, "refresh_token": current})
            rotated = answer.get("refresh_token")
            if isinstance(rotated, str) and rotated and rotated != current:
                self._unsaved = rotated
                try:
                    _replace(path, folder, rotated)
                    self._unsaved = ""
                except OSError as exc:
                    log.error("oauth2_refresh_token_not_saved account=%s error=%s (kept in memory; saved at the "
                              "next refresh)", self.account, type(exc).__name__)
            return answer
        finally:
            os.close(folder)  # and with it the lock


def _read(path: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise OAuth2Error("secret_unreadable", f"error={type(exc).__name__}") from None
    if not value:
        raise OAuth2Error("secret_unreadable", "error=empty_file")
    return value


def _replace(path: Path, folder: int, value: str) -> None:
    """Write `value` to `path` atomically: a 0600 temporary file beside it, fsync, rename, fsync the folder."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    os.fsync(folder)


def _post(url: str, form: dict[str, str]) -> dict[str, object]:
    """POST `form` to the token endpoint; its JSON answer, or OAuth2Error with the RFC 6749 error code."""
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            body = response.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        code = _error_code(exc) if exc.code < 500 else ""
        raise OAuth2Error(code if code in FINAL else "token_failed", f"http={exc.code} error={code or '-'}") from None
    except (OSError, ValueError) as exc:  # unreachable, timed out, TLS; a malformed URL
        raise OAuth2Error("token_failed", f"error={type(exc).__name__}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise OAuth2Error("token_failed", "error=bad_answer")
    return answer


def _error_code(answer: urllib.error.HTTPError) -> str:
    try:
        code = json.loads(answer.read(MAX_ANSWER)).get("error")
    except (OSError, ValueError, AttributeError):
        return ""
    return code if isinstance(code, str) and _CODE.fullmatch(code) else ""

