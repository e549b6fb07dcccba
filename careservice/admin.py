"""The admin listener ([admin] listen): /metrics for Prometheus, /healthz for load balancers, /stats for people.

It runs in the daemon's loop beside the contact form and serves nothing personal: counts, ages,
states, reply codes, site ids and IMAP folders, never an address, name, subject, case id, token or
client IP. With admin.token_file set, every request needs `Authorization: Bearer <token>`.

/metrics adds the store's state (read at scrape time through a read-only connection) to what both
processes counted (careservice.metrics).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from careservice import charts, metrics
from careservice.asgi import QuietServer, SecurityHeaders
from careservice.context import Context
from careservice.intake.ingest import Ingest
from careservice.metrics import ProcessFiles
from careservice.preflight import admin_token
from careservice.stats import report
from careservice.store import StoreError, statsdb
from careservice.supervisor import WorkerSupervisor

WORKER_LOOP_WITHIN = 30.0  # seconds: a worker whose loop has not beaten for longer is failing
CSP = ("default-src 'none'; style-src 'nonce-{nonce}'; img-src data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


@dataclass
class Parts:
    """What the admin listener looks at: the daemon's context, worker, intake and SMTP listener."""

    ctx: Context
    worker: WorkerSupervisor
    ingest: Ingest
    smtp_accepting: Callable[[], bool]


class StoreState:
    """The gauges that are states of the store or of the daemon, computed at each scrape."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        config = self.parts.ctx.config
        info = GaugeMetricFamily("careservice_build_info", "The running version.", labels=["version"])
        info.add_metric([version("careservice")], 1)
        yield info
        worker = self.parts.worker.beat_age() < WORKER_LOOP_WITHIN
        yield GaugeMetricFamily("careservice_worker_up", "1 while every worker process runs and its loop beats.",
                                value=int(worker))
        live = statsdb.live(config.data_dir, config.store)
        cases = GaugeMetricFamily("careservice_cases_open", "Cases forwarded and not yet purged.", labels=["site"])
        for site in dict.fromkeys([*(s.id for s in config.sites), *sorted(live.open_cases)]):
            cases.add_metric([site], live.open_cases.get(site, 0))
        yield cases
        yield GaugeMetricFamily("careservice_cases_stuck", "Cases held after a stage failed (retried with back-off).",
                                value=live.stuck_cases)
        yield GaugeMetricFamily("careservice_outbound_queue_messages", "Mail waiting for the relay.",
                                value=live.queued)
        age = 0.0 if live.oldest_queued is None else max(time.time() - live.oldest_queued, 0.0)
        yield GaugeMetricFamily("careservice_outbound_oldest_age_seconds", "Age of the oldest mail waiting for the "
                                "relay (0 when none waits).", value=age)
        boxes = GaugeMetricFamily("careservice_imap_mailbox_up", "1 while the IMAP mailbox (site/folder) is drained "
                                  "without problems.", labels=["mailbox"])
        states: dict[str, bool] = {}
        for box in config.imap:  # the label is site and folder only: the mailbox's own name holds a user name
            label = f"{box.site}/{box.folder}"
            states[label] = states.get(label, True) and live.mailboxes.get(box.name, False)
        for label, up in states.items():
            boxes.add_metric([label], int(up))
        yield boxes


class Guard:
    """Bearer token (when configured) on every admin request (inside SecurityHeaders, so a 401 has them too)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _allowed(self, scope: Scope) -> bool:
        if not self.token:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        refused = PlainTextResponse("Unauthorized", 401, {"WWW-Authenticate": 'Bearer realm="careservice admin"'})
        await refused(scope, receive, send)


class Admin:
    """The endpoints."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.registry = CollectorRegistry()
        ProcessFiles(self.registry)
        self.registry.register(StoreState(parts))
        self._relay = CollectorRegistry()  # the worker's relay gauge alone, for /healthz
        ProcessFiles(self._relay)

    def routes(self) -> list[Route]:
        return [Route("/metrics", self.metrics), Route("/healthz", self.healthz), Route("/stats", self.stats)]

    async def metrics(self, request: Request) -> Response:
        """The text format Prometheus asks for in Accept (OpenMetrics, or the classic text format by default)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        metrics.write_replies()
        try:
            body = await asyncio.to_thread(encode, self.registry)
        except (StoreError, sqlite3.Error):
            return PlainTextResponse("The store is not readable", 503)
        return Response(body, headers={"Content-Type": content_type})

    async def healthz(self, request: Request) -> Response:
        """200 while mail is taken in safely ("degraded" while the relay is down), else 503 naming what fails."""
        config = self.parts.ctx.config
        beat = self.parts.worker.beat_age()
        writable = await asyncio.to_thread(statsdb.writable, config.data_dir, config.store)
        checks = {
            "smtp": "ok" if self.parts.smtp_accepting() else "not_accepting",
            "store": "ok" if writable else "not_writable",
            "worker": "ok" if beat < WORKER_LOOP_WITHIN else "down" if math.isinf(beat) else "stalled",
            "disk": "low" if self.parts.ingest.disk_low() else "ok",  # a cached statvfs
        }
        failing = [name for name, state in checks.items() if state != "ok"]
        checks["relay"] = await asyncio.to_thread(self._relay_state)
        status = "failing" if failing else "degraded" if checks["relay"] == "down" else "ok"
        body = {"status": status, "checks": checks, **({"failing": failing} if failing else {})}
        return JSONResponse(body, 503 if failing else 200)

    def _relay_state(self) -> str:
        for metric in self._relay.collect():
            if metric.name == "careservice_relay_up" and metric.samples:
                return "up" if max(sample.value for sample in metric.samples) else "down"
        return "unknown"  # the worker has not reached the relay yet

    async def stats(self, request: Request) -> Response:
        try:
            html = await asyncio.to_thread(self._stats_page, request.state.csp_nonce)
        except (StoreError, sqlite3.Error):
            return PlainTextResponse("The store is not readable", 503)
        return HTMLResponse(html)

    def _stats_page(self, nonce: str) -> str:
        ctx = self.parts.ctx
        rep = report(ctx.config.data_dir, [site.id for site in ctx.config.sites], charts.PAGE_DAYS,
                     backend=ctx.config.store)
        return charts.page(rep, ctx.texts, nonce)


class AdminServer:
    """The admin listener's uvicorn server, running as a task in the daemon's loop."""

    def __init__(self, server: QuietServer, task: asyncio.Task[None]) -> None:
        self._server = server
        self._task = task

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


async def start_admin(parts: Parts) -> AdminServer | None:
    """Listen on admin.listen (bound before this returns); None when the listener is disabled."""
    config = parts.ctx.config
    if config.admin.listen is None:
        return None
    app = SecurityHeaders(Guard(Starlette(routes=Admin(parts).routes()), admin_token(config)), CSP)
    host, port = config.admin.listen.host, config.admin.listen.port
    bound = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    server = QuietServer(uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, server_header=False, http="h11", ws="none",
        limit_concurrency=50, timeout_graceful_shutdown=max(config.stop_timeout - 2, 1),
    ))
    return AdminServer(server, asyncio.create_task(server.serve(sockets=[socket.socket(fileno=bound.detach())])))
