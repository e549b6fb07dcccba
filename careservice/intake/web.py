"""The contact form per site: a Starlette app served by uvicorn inside the daemon's event loop.

A valid submission becomes an RFC 5322 message from the customer to the site's care address and
goes through Ingest exactly like a mail, so the stages forward it to staff and acknowledge it.
The verification code is sealed (AES-256-GCM) in an expiring token the page carries; redeemed
tokens are remembered in memory only. The client IP is used, as a keyed digest held in memory,
for the per-IP limits and nothing else; it and the User-Agent never reach a case, a mail or a log
line. X-Forwarded-For names the client only on connections from web.trusted_proxies (webguard).

Field rules: name, email, query and (with verification on) the code are mandatory. One-line fields
refuse every control character (CR, LF, NUL, U+2028, ...). The query may span lines; so may the
postal address (at most 6 lines), which the case keeps as one line joined with ", ".
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from email_validator import EmailNotValidError, validate_email
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from careservice import metrics
from careservice.asgi import QuietServer, SecurityHeaders
from careservice.config import Config, Site
from careservice.context import Context
from careservice.intake.codeart import MEDIA_TYPES, CodeArt
from careservice.intake.formguard import ALL, CodeTokens, RateLimit, take_all
from careservice.intake.ingest import Ingest
from careservice.intake.spamcheck import SpamCheck, form_message, form_probe
from careservice.intake.webguard import ConnectionGuard, bucket, client_address, guarded_protocol, trusted
from careservice.language import accepted_languages
from careservice.logs import error_fields
from careservice.mail import CONTROL, SYSTEM_LOCALPARTS, Draft, new_message_id, render
from careservice.model import ContactDetails, Envelope, NewMessage, Source
from careservice.preflight import check_web_tls
from careservice.spamverdict import SKIPPED, SpamVerdict, stamp

log = logging.getLogger("careservice.web")

SUBJECT_WIDTH = 40  # characters of the query a form case's subject shows after the brand
TOKEN_FIELD = "code_token"
HONEYPOT_FIELD = "website"  # hidden from people; robots fill it in
PREFERRED = ("email", "telephone")
MAX_BODY = 256 * 1024
BODY_SECONDS = 30.0
_PHONE = re.compile(r"(?=.*[0-9])[0-9+()./ -]+")


@dataclass(frozen=True)
class FieldRule:
    limit: int
    required: bool = False
    lines: int = 1  # more than 1: a multi-line field of at most this many lines


FIELDS: dict[str, FieldRule] = {
    "name": FieldRule(200, required=True),
    "email": FieldRule(254, required=True),
    "company": FieldRule(200),
    "address": FieldRule(300, lines=6),
    "telephone": FieldRule(50),
    "fax": FieldRule(50),
    "query": FieldRule(10_000, required=True, lines=1_000),
}


def field_problem(rule: FieldRule, value: str) -> str:
    """The error code for one field value ("" = fine): missing, too_long, control, too_many_lines."""
    if not value.strip():
        return "missing" if rule.required else ""
    if len(value) > rule.limit:
        return "too_long"
    if rule.lines == 1:
        return "control" if CONTROL.search(value) else ""
    lines = value.splitlines()  # CR, LF, U+2028, ... only separate lines here
    if any(CONTROL.search(line.replace("\t", " ")) for line in lines):
        return "control"
    return "too_many_lines" if len(lines) > rule.lines else ""


@dataclass(frozen=True)
class Entry:
    """How a request came in: its site and the contact path it used, which links and redirects keep."""

    site: Site
    url: str


class ContactForm:
    """The endpoints: form, submission, thank-you page, and the code as image and audio."""

    def __init__(self, config: Config, ctx: Context, ingest: Ingest, spam: SpamCheck) -> None:
        self.ctx = ctx  # ctx.config, not `config`: a reload changes the sites, their hosts and paths
        self.ingest = ingest
        self.spam = spam
        web = config.web
        self.tokens = (CodeTokens(ctx.keyring.form_code_key(), web.code_ttl_seconds, ctx.clock)
                       if web.verification == "image" else None)
        self.posts = RateLimit(web.max_posts_per_ip_per_hour)
        self.all_posts = RateLimit(web.max_posts_per_minute, 60.0)
        self.proxy_warned = False
        self.codes = CodeArt(web)

    def client(self, request: Request) -> str:
        """The key of the per-client limits for the client behind `request`."""
        proxies = self.ctx.config.web.trusted_proxies
        address = client_address(request.client.host if request.client else "", request.headers.getlist(
            "x-forwarded-for"), proxies)
        if trusted(address, proxies) and not self.proxy_warned:  # the README's proxy setup always names one
            self.proxy_warned = True
            log.warning("web_proxy_unnamed (X-Forwarded-For from a trusted proxy names no client: "
                        "its customers share one limit)")
        return bucket(address)

    def routes(self) -> list[Route]:
        """Each page under `/<site id>/contact` for any host; any other path goes to `by_host`."""
        return [*(Route("/{site}/contact" + page, endpoint, methods=[method])
                  for page, endpoints in self.pages().items() for method, endpoint in endpoints.items()),
                Route("/{path:path}", self.by_host, methods=["GET", "POST"])]

    def pages(self) -> dict[str, dict[str, Callable[[Request], Awaitable[Response]]]]:
        return {"": {"GET": self.show, "POST": self.submit}, "/thanks": {"GET": self.thanks},
                "/code.png": {"GET": self.code_image}, "/code.wav": {"GET": self.code_audio}}

    async def by_host(self, request: Request) -> Response:
        """A page under the contact_path of the site whose web_hosts hold the request's Host."""
        site = self._host_site(request)
        path = request.url.path
        if site is None or not path.startswith(site.contact_path):
            return not_found()
        endpoint = self.pages().get(path.removeprefix(site.contact_path), {}).get(request.method)
        return not_found() if endpoint is None else await endpoint(request)

    def _host_site(self, request: Request) -> Site | None:
        host = request.headers.get("host", "").split(":", 1)[0].lower()
        return next((site for site in self.ctx.config.sites if host in site.web_hosts), None)

    def _resolve(self, request: Request, page: str) -> Entry | None:
        """The site and contact path of a request for `page` ("" or "/thanks", ...), or None for a 404.

        A known site id in the path wins; otherwise the Host must be one of a site's web_hosts and the
        path that site's contact_path plus `page` (so a contact_path shaped like `/<word>/contact` works too).
        """
        site = self.ctx.config.site(request.path_params.get("site", ""))
        if site is not None:
            return Entry(site, f"/{site.id}/contact")
        site = self._host_site(request)
        if site is None or request.url.path != site.contact_path + page:
            return None
        return Entry(site, site.contact_path)

    def language(self, request: Request) -> str:
        """The best of the browser's languages (Accept-Language) that has texts; "" for the site's."""
        return self.ctx.texts.choose(accepted_languages(request.headers.get("accept-language", "")[:500]))

    def _page(self, request: Request, entry: Entry, name: str, status: int = 200,
              headers: dict[str, str] | None = None, **values: Any) -> HTMLResponse:
        html = self.ctx.texts.page(entry.site.id, name, self.language(request), site=entry.site,
                                   contact_url=entry.url, nonce=request.state.csp_nonce, **values)
        return HTMLResponse(html, status_code=status, headers=headers)

    def _form(self, request: Request, entry: Entry, values: dict[str, str], errors: dict[str, str],
              notice: str = "", status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
        token = self.tokens.issue(entry.site.id)[0] if self.tokens else ""
        return self._page(request, entry, "form", status, headers, values=values, errors=errors, notice=notice,
                          token=token, limits={k: r.limit for k, r in FIELDS.items()},
                          token_field=TOKEN_FIELD, honeypot_field=HONEYPOT_FIELD)

    async def show(self, request: Request) -> Response:
        entry = self._resolve(request, "")
        return not_found() if entry is None else self._form(request, entry, {"preferred_contact": "email"}, {})

    async def thanks(self, request: Request) -> Response:
        entry = self._resolve(request, "/thanks")
        return not_found() if entry is None else self._page(request, entry, "thanks")

    async def submit(self, request: Request) -> Response:
        entry = self._resolve(request, "")
        if entry is None:
            return not_found()
        site = entry.site
        length = request.headers.get("content-length", "")
        if not length.isdigit() or "transfer-encoding" in request.headers:
            return PlainTextResponse("Length required", 411)
        if int(length) > MAX_BODY:
            return PlainTextResponse("Request too large", 413)
        try:
            async with asyncio.timeout(BODY_SECONDS):
                form = await request.form(max_files=0, max_fields=50, max_part_size=MAX_BODY)
        except TimeoutError:
            return PlainTextResponse("Request timeout", 408)
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        client = self.client(request)
        wait = take_all((self.posts, client), (self.all_posts, ALL))
        if wait:
            log.info("form_refused site=%s reason=%s", site.id, "rate_limited" if self.posts.wait(client) else "busy")
            metrics.form_post(site.id, "rate_limited")
            return self._form(request, entry, values, {}, "rate_limited", 429, {"Retry-After": str(math.ceil(wait))})
        if values.get(HONEYPOT_FIELD):
            log.info("form_refused site=%s reason=honeypot", site.id)
            metrics.form_post(site.id, "invalid")
            return RedirectResponse(f"{entry.url}/thanks", 303)
        contact, errors = self.validate(values)
        token_id = b""
        if self.tokens is not None:
            problem, token_id = self.tokens.redeem(site.id, values.get(TOKEN_FIELD, ""),
                                                   values.get("verification_code", "")[:50])
            if problem:
                errors["verification_code"] = problem
        if errors:
            log.info("form_refused site=%s reason=invalid fields=%s", site.id, ",".join(sorted(errors)))
            metrics.form_post(site.id, "bad_code" if list(errors) == ["verification_code"] else "invalid")
            return self._form(request, entry, values, errors, status=400)
        assert contact is not None  # no errors: validate returned the details
        if self.ingest.disk_low():  # a cached statvfs, as at SMTP RCPT
            log.warning("form_refused site=%s reason=disk_low", site.id)
            metrics.form_post(site.id, "unavailable")
            return self._form(request, entry, values, {}, "unavailable", 503)
        title = subject(site, values["query"])
        verdict = SKIPPED
        if self.spam.enabled:  # the message rspamd reads is rendered for it alone
            verdict = await self.spam.check(form_message(site, contact, values["query"], title),
                                            form_probe(site, contact.email))
        if verdict.result == "reject":
            log.info("form_refused site=%s reason=spam", site.id)
            metrics.form_post(site.id, "spam")
            return self._form(request, entry, values, {}, "refused", 400)
        try:
            message = self.message(site, contact, values["query"], title, token_id, verdict, self.language(request))
            ids = await self.ingest.accept([message], "web")
        except Exception as exc:  # not committed: the customer keeps the page and can send it again
            log.error("form_failed site=%s %s", site.id, error_fields(exc))
            metrics.form_post(site.id, "unavailable")
            return self._form(request, entry, values, {}, "unavailable", 503)
        if not ids[0]:
            log.info("form_refused site=%s reason=code_reused", site.id)
            metrics.form_post(site.id, "bad_code")
            return self._form(request, entry, values, {"verification_code": "code_used"}, status=400)
        metrics.form_post(site.id, "accepted")
        return RedirectResponse(f"{entry.url}/thanks", 303)

    def validate(self, values: dict[str, str]) -> tuple[ContactDetails | None, dict[str, str]]:
        """The customer's details from the form, or the error code of each wrong field."""
        clean = {name: values.get(name, "").strip() for name in FIELDS}
        errors = {name: problem for name, rule in FIELDS.items()
                  if (problem := field_problem(rule, values.get(name, "")))}
        email = ""
        if "email" not in errors:
            try:
                email = validate_email(clean["email"], check_deliverability=False, allow_smtputf8=False).ascii_email
            except EmailNotValidError:
                errors["email"] = "invalid"
            else:
                if email.rsplit("@", 1)[0].lower() in SYSTEM_LOCALPARTS:
                    errors["email"] = "system"  # classify would discard it as automatic mail
                elif self.ctx.addressing.is_ours(email):
                    errors["email"] = "ours"
        for name in ("telephone", "fax"):
            if name not in errors and clean[name] and not _PHONE.fullmatch(clean[name]):
                errors[name] = "phone_chars"
        preferred = values.get("preferred_contact") or "email"
        if preferred not in PREFERRED:
            errors["preferred_contact"] = "invalid"
        elif preferred == "telephone" and not clean["telephone"] and "telephone" not in errors:
            errors["telephone"] = "phone_needed"
        if errors:
            return None, errors
        address = ", ".join(line.strip() for line in clean["address"].splitlines() if line.strip())
        return ContactDetails(clean["name"], email, address, clean["telephone"], clean["fax"], clean["company"],
                              preferred), {}

    def message(self, site: Site, contact: ContactDetails, query: str, title: str, token_id: bytes,
                verdict: SpamVerdict, language: str) -> NewMessage:
        """The submission as a mail to the care address, in the customer's `language` (Content-Language,
        as a mail would say it); header values cannot break lines (mail.render)."""
        draft = Draft(from_name=contact.name, from_address=contact.email, to=(site.care_address,),
                      subject=title, text="\n".join(query.splitlines()).rstrip(),
                      message_id=new_message_id(site.domain), language=language)
        dedupe = self.ctx.keyring.digest(f"form code {token_id.hex()}") if token_id else b""
        return NewMessage(site.id, Source.WEB, Envelope(contact.email, site.care_address),
                          stamp(render(draft), verdict), contact=contact, dedupe=dedupe)

    async def _code(self, request: Request, kind: str) -> Response:
        entry = self._resolve(request, f"/code.{kind}")
        code = self.tokens.reveal(entry.site.id, request.query_params.get("t", "")) if entry and self.tokens else None
        if code is None:
            return not_found()
        wait = self.codes.admit(kind, self.client(request))
        if wait:
            return PlainTextResponse("Too many requests", 429, {"Retry-After": str(math.ceil(wait))})
        return Response(await self.codes.draw(kind, code), media_type=MEDIA_TYPES[kind])

    async def code_image(self, request: Request) -> Response:
        return await self._code(request, "png")

    async def code_audio(self, request: Request) -> Response:
        return await self._code(request, "wav")


def subject(site: Site, query: str) -> str:
    """A form case's subject: the brand and the query's first words ("TicketNest: Where are my tickets …")."""
    words = " ".join(query.split())
    shown = textwrap.shorten(words, SUBJECT_WIDTH, placeholder=" …")
    return f"{site.name}: {words[:SUBJECT_WIDTH - 2] + ' …' if shown == '…' else shown}"  # "…": one long word


def not_found() -> Response:
    return PlainTextResponse("Not found", 404)


class WebServer:
    """The contact form's uvicorn server, running as a task in the daemon's loop."""

    def __init__(self, server: QuietServer, task: asyncio.Task[None], form: ContactForm) -> None:
        self._server = server
        self._task = task
        self._form = form

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task
        self._form.codes.close()


async def start_web(config: Config, ctx: Context, ingest: Ingest, spam: SpamCheck) -> WebServer:
    """Listen on web.listen (bound before this returns) and serve the contact form, over HTTPS with web.tls_cert."""
    check_web_tls(config)
    form = ContactForm(config, ctx, ingest, spam)
    csp = ("default-src 'self'; style-src 'nonce-{nonce}'; script-src 'none'; form-action 'self'; base-uri 'none'; "
           f"frame-ancestors {config.web.frame_ancestors}")
    app = SecurityHeaders(Starlette(routes=form.routes()), csp,
                          hsts=config.web.tls_cert is not None)
    host, port = config.web.listen.host, config.web.listen.port
    bound = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock = socket.socket(fileno=bound.detach())  # proto read back as TCP, so asyncio sets TCP_NODELAY per client
    web = config.web
    guard = ConnectionGuard(web.header_timeout, web.max_connections_per_client, web.trusted_proxies)
    server = QuietServer(uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, server_header=False, http=guarded_protocol(guard),
        ws="none", proxy_headers=False, limit_concurrency=500,
        timeout_graceful_shutdown=max(config.stop_timeout - 2, 1), ssl_certfile=config.web.tls_cert,
        ssl_keyfile=config.web.tls_key,
    ))
    return WebServer(server, asyncio.create_task(server.serve(sockets=[sock])), form)
