"""OAuth2 (SASL XOAUTH2) for IMAP and the relay, against a real Dovecot that introspects tokens at a test
provider on 127.0.0.1, and an aiosmtpd relay that checks them there."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import AuthResult

from careservice.config import ConfigError
from careservice.config import load_config
from careservice.oauth2 import OAuth2Error
from careservice.oauth2 import TokenSource
from careservice.settings import OAuth2Config
from tests.dovecot import DovecotServer
from tests.dovecot import dovecot_binary
from tests.dovecot import start_dovecot
from tests.oauth_server import OAuthServer
from tests.reliability.helpers import set_keys
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import imap_config
from tests.support import send
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.imap
CUSTOMER = "alice@customer.example"
SCOPE = "https://outlook.office365.com/.default"


@pytest.fixture
def provider() -> Iterator[OAuthServer]:
    server = OAuthServer(username="care").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dovecot(tmp_path: Path, provider: OAuthServer) -> Iterator[DovecotServer]:
    """The test Dovecot, taking XOAUTH2 with tokens the provider vouches for."""
    if dovecot_binary() is None:
        pytest.skip("dovecot binary not found (apt-get install dovecot-imapd)")
    server = start_dovecot(tmp_path, introspection_url=f"{provider.url}/introspect")
    try:
        yield server
    finally:
        server.stop()


def oauth2_lines(tmp: Path, provider: OAuthServer, grant: str, secret: str = "") -> str:
    """The auth lines of a table: the client secret (and a refresh token) in 0600 files under `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "client.secret").write_text((secret or provider.secret) + "\n")
    lines = (f'auth = "oauth2"\ntoken_url = "{provider.url}/token"\nclient_id = "{provider.client_id}"\n'
             f'client_secret_file = "{tmp / "client.secret"}"\ngrant = "{grant}"\n')
    if grant == "refresh_token":
        (tmp / "tokens").mkdir(exist_ok=True)
        (tmp / "tokens" / "refresh.token").write_text(provider.new_refresh_token() + "\n")
        return lines + f'refresh_token_file = "{tmp / "tokens" / "refresh.token"}"\n'
    return lines + f'scope = "{SCOPE}"\n'


def oauth2_config(tmp: Path, relay: CaptureRelay, dovecot: DovecotServer, provider: OAuthServer, grant: str) -> Path:
    """A daemon's config whose mailbox logs in with tokens of `grant` from `provider`."""
    return imap_config(tmp, relay, dovecot, auth=oauth2_lines(tmp, provider, grant))


def health(daemon: Daemon, dovecot: DovecotServer) -> dict[str, object]:
    return daemon.status().get("imap", {}).get(f"care@127.0.0.1:{dovecot.port}/INBOX", {})


def forwarded(relay: CaptureRelay, subject: str) -> bool:
    return any(subject in str(c.message["Subject"]) for c in relay.to(STAFF))


def test_client_credentials_drain_the_mailbox_and_renew_the_session_before_the_token_expires(
        tmp_path: Path, relay: CaptureRelay, dovecot: DovecotServer, provider: OAuthServer) -> None:
    provider.expires_in = 4  # renewed 0.4 s before it expires
    config = oauth2_config(tmp_path / "svc", relay, dovecot, provider, "client_credentials")
    dovecot.append(customer_mail("Before start", "waiting"))
    with Daemon(config) as daemon:
        wait_for(lambda: forwarded(relay, "Before start"), what="forward of mail taken with a token")
        assert provider.requests[0] == {"grant_type": "client_credentials", "scope": SCOPE}
        wait_for(lambda: len(provider.requests) >= 3, timeout=15, what="two renewals")
        assert daemon.log.read_text().count("imap_reconnecting") >= 2
        dovecot.append(customer_mail("After renewal", "still taken"))
        wait_for(lambda: forwarded(relay, "After renewal"), what="forward after the first token expired")
        assert health(daemon, dovecot)["ok"] is True


def test_a_rotated_refresh_token_is_saved_0600_and_used(tmp_path: Path, relay: CaptureRelay,
                                                        dovecot: DovecotServer, provider: OAuthServer) -> None:
    provider.expires_in = 4
    config = oauth2_config(tmp_path / "svc", relay, dovecot, provider, "refresh_token")
    stored = tmp_path / "svc" / "tokens" / "refresh.token"
    first = stored.read_text().strip()
    with Daemon(config):
        wait_for(lambda: len(provider.requests) >= 3, timeout=15, what="three refreshes")
        dovecot.append(customer_mail("Rotated", "taken with the newest token"))
        wait_for(lambda: forwarded(relay, "Rotated"), what="forward")
    assert provider.requests[0]["refresh_token"] == first and "scope" not in provider.requests[0]
    assert [form["refresh_token"] for form in provider.requests[1:]] != [first] * (len(provider.requests) - 1)
    assert provider.refresh_tokens == {stored.read_text().strip()}  # the one the provider still takes
    assert stored.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in stored.parent.iterdir()] == ["refresh.token"]  # no temporary file left


@pytest.mark.parametrize("problem", ["invalid_grant", "invalid_client"])
def test_a_refused_grant_or_client_stops_the_mailbox_until_a_reload(tmp_path: Path, relay: CaptureRelay,
                                                                    dovecot: DovecotServer, provider: OAuthServer,
                                                                    problem: str) -> None:
    lines = oauth2_lines(tmp_path / "svc", provider, "refresh_token",
                         secret="expired-secret" if problem == "invalid_client" else "")
    token_file = tmp_path / "svc" / "tokens" / "refresh.token"
    if problem == "invalid_grant":
        token_file.write_text("revoked-by-the-user\n")
    with Daemon(imap_config(tmp_path / "svc", relay, dovecot, auth=lines)) as daemon:
        wait_for(lambda: health(daemon, dovecot).get("problem") == f"oauth2_{problem}", what="the problem in status")
        assert health(daemon, dovecot)["ok"] is False
        time.sleep(4)  # a back-off would have asked again after 1 s and 3 s
        assert len(provider.requests) == 1
        assert daemon.log.read_text().count("imap_stopped") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin_port}/metrics", timeout=10) as answer:
            assert 'careservice_imap_mailbox_up{mailbox="ticketnest/INBOX"} 0.0' in answer.read().decode()
        (tmp_path / "svc" / "client.secret").write_text(provider.secret + "\n")
        token_file.write_text(provider.new_refresh_token() + "\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: health(daemon, dovecot).get("ok") is True, what="the mailbox working after the reload")


def test_an_unreachable_token_endpoint_is_retried_with_back_off(tmp_path: Path, relay: CaptureRelay,
                                                                dovecot: DovecotServer, provider: OAuthServer) -> None:
    provider.fail_with = 503
    config = oauth2_config(tmp_path / "svc", relay, dovecot, provider, "client_credentials")
    with Daemon(config) as daemon:
        wait_for(lambda: health(daemon, dovecot).get("problem") == "oauth2_token_failed", what="the problem")
        wait_for(lambda: len(provider.requests) >= 2, what="a retry")
        provider.fail_with = 0
        wait_for(lambda: health(daemon, dovecot).get("ok") is True, what="recovery without a reload")
        assert "http=503" in daemon.log.read_text()


@dataclass
class OAuthRelay(CaptureRelay):
    """A relay that takes mail only after AUTH XOAUTH2 with a token the provider issued and is still valid."""

    provider: OAuthServer | None = None
    logins: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.options = {"auth_required": True, "auth_require_tls": False}

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802 (aiosmtpd's name)
        fields = base64.b64decode(args[1]).decode().split("\x01") if len(args) == 2 else []
        assert self.provider is not None
        ok = len(fields) == 4 and fields[0] == f"user={CARE}" and fields[1].startswith("auth=Bearer ") and \
            self.provider.valid(fields[1].removeprefix("auth=Bearer "))
        self.logins.append(ok)
        return AuthResult(success=ok)


def relay_config(tmp: Path, relay: OAuthRelay, provider: OAuthServer, secret: str = "") -> Path:
    config = set_keys(write_config(tmp, relay.port), "relay", allow_plaintext=True, username=CARE)
    text = config.read_text()
    config.write_text(text.replace("[relay]\n", "[relay]\n" + oauth2_lines(tmp, provider, "client_credentials",
                                                                           secret), 1))
    return config


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # plain text on loopback
def test_the_relay_takes_mail_with_xoauth2_and_a_renewed_token(tmp_path: Path, provider: OAuthServer) -> None:
    provider.expires_in = 4
    relay = OAuthRelay(provider=provider).start()
    with Daemon(relay_config(tmp_path, relay, provider)) as daemon:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("First", "one"))
        wait_for(lambda: len(relay.received) == 3, what="forwards and acknowledgement")
        time.sleep(6)  # the token expired, and the relay connection was closed after 5 s unused
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Second", "two"))
        wait_for(lambda: len(relay.received) == 6, what="the second forwards and acknowledgement")
        relay.stop()
    assert relay.logins and all(relay.logins) and len(provider.requests) >= 2


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_refused_client_stops_asking_for_relay_tokens_until_a_reload(tmp_path: Path, provider: OAuthServer) -> None:
    relay = OAuthRelay(provider=provider).start()
    config = relay_config(tmp_path, relay, provider, secret="expired-secret")
    with Daemon(config) as daemon:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Waiting", "for a token"))
        wait_for(lambda: daemon.log.read_text().count("relay_down") >= 2, what="two delivery rounds")
        log = daemon.log.read_text()
        assert "problem=oauth2_invalid_client" in log and log.count("oauth2_stopped") == 1
        assert len(provider.requests) == 1 and relay.received == []
        (tmp_path / "client.secret").write_text(provider.secret + "\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(relay.received) == 3, what="delivery after the reload")
        relay.stop()


def test_one_request_refreshes_for_all_callers_and_again_before_expiry(tmp_path: Path,
                                                                       provider: OAuthServer) -> None:
    provider.expires_in, provider.delay = 2, 0.3  # renewed at 1.8 s; the callers all arrive during the first request
    (tmp_path / "secret").write_text(provider.secret)
    source = TokenSource(OAuth2Config(f"{provider.url}/token", provider.client_id, str(tmp_path / "secret"), SCOPE,
                                      "client_credentials", ""), "test")
    tokens: list[str] = []
    callers = [threading.Thread(target=lambda: tokens.append(source.token())) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    assert len(set(tokens)) == 1 and len(tokens) == 4 and len(provider.requests) == 1
    time.sleep(1.6)  # 1.9 s after the first request
    assert source.token() != tokens[0] and len(provider.requests) == 2
    assert provider.valid(source.token())


def test_a_refused_grant_is_final_and_asked_again_only_after_reset(tmp_path: Path, provider: OAuthServer) -> None:
    (tmp_path / "refresh").write_text("revoked\n")
    (tmp_path / "secret").write_text(provider.secret)
    source = TokenSource(OAuth2Config(f"{provider.url}/token", provider.client_id, str(tmp_path / "secret"), "",
                                      "refresh_token", str(tmp_path / "refresh")), "test")
    for _ in range(2):
        with pytest.raises(OAuth2Error) as raised:
            source.token()
        assert raised.value.code == "invalid_grant" and raised.value.final
    assert len(provider.requests) == 1
    source.reset()
    with pytest.raises(OAuth2Error):
        source.token()
    assert len(provider.requests) == 2


@pytest.mark.parametrize(("lines", "key", "problem"), [
    ('auth = "oauth"', "imap[0].auth", "expected one of password, oauth2"),
    ('token_url = "https://login.example/token"', "imap[0].token_url", 'only with auth = "oauth2"'),
    ('auth = "oauth2"\ntoken_url = "http://login.example/token"\nclient_id = "c"\ngrant = "client_credentials"',
     "imap[0].token_url", "https://"),
    ('auth = "oauth2"\ntoken_url = "https://login.example/token"\nclient_id = "c"\ngrant = "client_credentials"',
     "imap[0].client_secret_file", "needed with"),
    ('auth = "oauth2"\ntoken_url = "https://login.example/token"\nclient_id = "c"\ngrant = "refresh_token"',
     "imap[0].refresh_token_file", "needed with"),
    ('auth = "oauth2"\ntoken_url = "https://login.example/token"\nclient_id = "c"\ngrant = "password"',
     "imap[0].grant", "expected one of"),
])
def test_oauth2_settings_that_cannot_work_are_errors_naming_the_key(tmp_path: Path, lines: str, key: str,
                                                                    problem: str) -> None:
    password = "" if "oauth2" in lines else 'password_file = "p"'
    config = write_config(tmp_path, 1, extra=f'[[imap]]\nsite = "ticketnest"\nhost = "imap.example"\n'
                                             f'username = "care@ticketnest.test"\n{lines}\n{password}\n')
    with pytest.raises(ConfigError, match=re.escape(problem)) as raised:
        load_config(config)
    assert raised.value.key == key


def test_check_names_an_unreadable_oauth2_file(tmp_path: Path, provider: OAuthServer) -> None:
    config = relay_config(tmp_path, OAuthRelay(provider=provider), provider)
    (tmp_path / "client.secret").unlink()
    result = subprocess.run([sys.executable, "-m", "careservice", "check", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert re.search(r"relay\.client_secret_file: cannot read .*client\.secret", result.stderr)
