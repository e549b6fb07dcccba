"""What the two HTTP listeners (the contact form, the admin listener) share: the security headers on
every response, and a uvicorn server that leaves the signals to the daemon."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class SecurityHeaders:
    """Adds the security headers to every response, and a per-response CSP nonce (in the request
    state as `csp_nonce`) for the pages' inline style. `csp` is the policy with `{nonce}` in it. With
    `hsts` (the daemon serves HTTPS itself) browsers are told to use only HTTPS for a year."""

    def __init__(self, app: ASGIApp, csp: str, hsts: bool = False) -> None:
        self.app = app
        self.csp = csp
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        await self.app(scope, receive, self.sender(send, nonce))

    def sender(self, send: Send, nonce: str) -> Send:
        """`send` with the headers added to the response start."""
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = self.csp.format(nonce=nonce)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Cache-Control"] = "no-store"
                if self.hsts:
                    headers["Strict-Transport-Security"] = "max-age=31536000"
            await send(message)
        return with_headers


class QuietServer(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The daemon owns SIGTERM and SIGINT; uvicorn stops when its owner sets should_exit."""
        yield
