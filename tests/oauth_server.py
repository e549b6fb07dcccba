"""A test OAuth2 provider on 127.0.0.1: token endpoint (RFC 6749) and token introspection (RFC 7662)."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer


@dataclass
class OAuthServer:
    """Issues tokens for `username` to client `client_id`/`secret`; `refresh_tokens` holds the valid ones."""

    username: str
    client_id: str = "careservice-test"
    secret: str = "client-secret"
    expires_in: int = 3600
    rotate: bool = True  # hand out a new refresh token with each refresh, the old one then invalid
    refresh_tokens: set[str] = field(default_factory=set)
    requests: list[dict[str, str]] = field(default_factory=list)  # every /token form, client auth removed
    fail_with: int = 0  # answer /token with this HTTP status (e.g. 503) instead
    delay: float = 0.0  # seconds each /token answer takes
    _tokens: dict[str, float] = field(default_factory=dict)  # access token -> expiry (monotonic)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def new_refresh_token(self) -> str:
        token = secrets.token_urlsafe(24)
        self.refresh_tokens.add(token)
        return token

    def valid(self, token: str) -> bool:
        return self._tokens.get(token, 0.0) > time.monotonic()

    def start(self) -> OAuthServer:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                if self.path == "/introspect":
                    self._answer(200, {"active": True, "username": provider.username} if provider.valid(
                        form.get("token", "")) else {"active": False})
                elif self.path == "/token":
                    self._answer(*provider.token(form, self.headers.get("Authorization", "")))
                else:
                    self._answer(404, {})

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, object]]:
        """The /token answer: (HTTP status, JSON body)."""
        client, secret = form.pop("client_id", ""), form.pop("client_secret", "")
        if authorization.startswith("Basic "):
            client, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        self.requests.append(form)
        time.sleep(self.delay)
        if self.fail_with:
            return self.fail_with, {"error": "temporarily_unavailable"}
        if (client, secret) != (self.client_id, self.secret):
            return 401, {"error": "invalid_client"}
        answer: dict[str, object] = {"token_type": "Bearer", "expires_in": self.expires_in}
        if form.get("grant_type") == "refresh_token":
            if form.get("refresh_token") not in self.refresh_tokens:
                return 400, {"error": "invalid_grant", "error_description": "token revoked"}
            if self.rotate:
                self.refresh_tokens.discard(form["refresh_token"])
                answer["refresh_token"] = self.new_refresh_token()
        elif form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        access = secrets.token_urlsafe(24)
        self._tokens[access] = time.monotonic() + self.expires_in
        return 200, {**answer, "access_token": access}
