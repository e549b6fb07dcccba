"""The admin listener against the real daemon: /metrics after real traffic, /healthz, the token, /stats, `stats`."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser import chromium_page
from tests.browser import needs_chromium
from tests.dovecot import DovecotServer
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import imap_config
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config
from tests.webclient import VALID
from tests.webclient import Reply
from tests.webclient import call
from tests.webclient import serving

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ALICE, CAROL, DAVE, ZOE = ("alice@customer.example", "carol@customer.example", "dave@customer.example",
                           "zoe-marker@customer.example")
FORGER = "mallory@forger.example"
CLIENT_IP = "203.0.113.77"
SCREENSHOT = Path("/tmp/stats.png")


def get(daemon: Daemon, path: str, token: str = "") -> Reply:
    return call(daemon.admin_port, "GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})


def scrape(daemon: Daemon) -> Samples:
    """Every sample of /metrics, read with Prometheus's own text parser."""
    reply = get(daemon, "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def admin_serving(daemon: Daemon) -> Daemon:
    wait_for(lambda: _answers(daemon), what="admin port")
    return daemon


def _answers(daemon: Daemon) -> bool:
    try:
        return get(daemon, "/healthz").status in (200, 401, 503)
    except OSError:
        return False


def opened(relay: CaptureRelay, before: int) -> EmailMessage:
    wait_for(lambda: len(relay.to(STAFF)) > before, what="forward to staff")
    return relay.to(STAFF)[-1].message


def reply_address(forward: EmailMessage) -> str:
    return forward["Reply-To"].addresses[0].addr_spec


def stats_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "careservice", "stats", *args, "--config", str(daemon.config)],
                          capture_output=True, text=True, timeout=60)


def today_row(daemon: Daemon, site: str) -> dict[str, object]:
    rows = json.loads(stats_cli(daemon, "--json", "--days", "1").stdout)["rows"]
    return next(row for row in rows if row["site"] == site)


@dataclass
class Traffic:
    daemon: Daemon
    relay: CaptureRelay
    before: Samples
    after: Samples
    markers: list[str]  # what must never show on the admin listener


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    """One daemon through a day's kinds of work: mail, form posts, an answer, #closed, a forged reply, an expiry."""
    relay = CaptureRelay().start()
    daemon = admin_serving(serving(Daemon(write_config(tmp_path_factory.mktemp("admin"), relay.port)).start()))
    try:
        before = scrape(daemon)
        send(daemon.smtp_port, ALICE, [CARE], customer_mail("Subject-marker-alpha", "Body-marker-alpha", ALICE))
        to_alice = opened(relay, 0)
        form = call(daemon.web_port, "POST", "/ticketnest/contact", {**VALID, "email": ZOE, "name": "Zoe Markername"},
                    {"X-Forwarded-For": CLIENT_IP})
        assert form.status == 303
        to_zoe = opened(relay, 1)
        to_zoe2 = relay.to(STAFF2)[-1].message  # the second staff address's copy, with its own reply address
        refused = call(daemon.web_port, "POST", "/ticketnest/contact", {**VALID, "email": ""},
                       {"X-Forwarded-For": CLIENT_IP})
        assert refused.status == 400
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            client.ehlo()
            client.mail(ALICE)
            assert client.rcpt("someone@elsewhere.example")[0] == 550
        send(daemon.smtp_port, CAROL, ["care@ixs.test"], customer_mail("Subject-marker-ixs", "stays open", CAROL))
        opened(relay, 2)
        send(daemon.smtp_port, DAVE, [CARE], customer_mail("Subject-marker-old", "nobody answers", DAVE))
        to_dave = opened(relay, 3)
        send(daemon.smtp_port, STAFF, [reply_address(to_alice)], staff_reply(to_alice, "Answer-marker text"))
        send(daemon.smtp_port, STAFF2, [reply_address(to_zoe2)], staff_reply(to_zoe2, "#closed", STAFF2))
        send(daemon.smtp_port, FORGER, [reply_address(to_dave)], staff_reply(to_dave, "Forged-marker", FORGER))
        wait_for(lambda: [c for c in relay.to(ALICE) if "Answer-marker" in c.raw.decode()], what="answer")
        wait_for(lambda: "reason=reply_not_from_staff" in daemon.log.read_text(), what="forged reply refused")
        wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="queue drained")
        dave_case = reply_address(to_dave).split("+", 1)[1].split(".", 1)[0]
        with sqlite3.connect(daemon.data_dir / "cases.db", timeout=10) as conn:
            conn.execute("UPDATE cases SET next_run = 0, created = created - 30.5 * 86400 WHERE id = ?",
                         (dave_case,))  # retention.unanswered_days passed (not yet the hard limit)
        wait_for(lambda: [c for c in relay.to(STAFF) if "Expired" in str(c.message["Subject"])], what="expiry")
        wait_for(lambda: daemon.status() == {"open_cases": 1, "inbound_pending": 0, "outbound_queued": 0,
                                             "stuck_cases": 0}, what="everything but the ixs case purged")
        wait_for(lambda: today_row(daemon, "ticketnest")["form_accepted"] == 1, what="form results stored")
        log = daemon.log.read_text()
        case_ids = set(re.findall(r"\bcases?=([0-9a-f]{12})\b", log))
        assert len(case_ids) == 7  # four cases and three replies to them
        tokens = [reply_address(m).split("@")[0].split("+", 1)[1] for m in (to_alice, to_zoe, to_dave)]
        markers = [ALICE, CAROL, DAVE, ZOE, FORGER, STAFF, STAFF2, CARE, "Alice Example", "Zoe Markername",
                   "Subject-marker", "Body-marker", "Answer-marker", "Forged-marker", CLIENT_IP, "customer.example",
                   *case_ids, *tokens]
        yield Traffic(daemon, relay, before, scrape(daemon), markers)
    finally:
        daemon.stop()
        relay.stop()


def test_traffic_moves_each_counter_by_its_amount(traffic: Traffic) -> None:
    expected = {  # six mails (3 customers, answer, #closed, forgery) and one form post taken in
        ("careservice_messages_received_total", (("channel", "smtp"),)): 6,
        ("careservice_messages_received_total", (("channel", "web"),)): 1,
        ("careservice_messages_received_total", (("channel", "imap"),)): 0,
        ("careservice_intake_commit_seconds_count", ()): 7,
        ("careservice_smtp_replies_total", (("code", "354"),)): 6,
        ("careservice_smtp_replies_total", (("code", "550"),)): 1,
        ("careservice_form_posts_total", (("result", "accepted"), ("site", "ticketnest"))): 1,
        ("careservice_form_posts_total", (("result", "invalid"), ("site", "ticketnest"))): 1,
        ("careservice_form_posts_total", (("result", "bad_code"), ("site", "ticketnest"))): 0,
        ("careservice_cases_opened_total", (("site", "ticketnest"),)): 3,
        ("careservice_cases_opened_total", (("site", "ixs"),)): 1,
        ("careservice_cases_answered_total", (("site", "ticketnest"),)): 1,
        ("careservice_cases_closed_by_phone_total", (("site", "ticketnest"),)): 1,
        ("careservice_cases_expired_total", (("site", "ticketnest"),)): 1,
        ("careservice_replies_refused_total", (("reason", "not_from_staff"), ("site", "ticketnest"))): 1,
        # 7 forwards (one per staff address: 3 ticketnest cases to 2, the ixs case to 1), 4 acknowledgements,
        # the answer, the expiry notice to staff and the notice to the site's staff that a reply was
        # refused because of its sender
        ("careservice_deliveries_total", (("result", "sent"),)): 14,
        ("careservice_deliveries_total", (("result", "deferred"),)): 0,
        ("careservice_time_to_answer_seconds_count", (("site", "ticketnest"),)): 1,
        ("careservice_purge_lag_seconds_count", ()): 1,
    }
    got = {key: traffic.after.get(key, 0.0) - traffic.before.get(key, 0.0) for key in expected}
    assert got == expected
    assert value(traffic.after, "careservice_time_to_answer_seconds_bucket", le="300.0", site="ticketnest") == 1
    after = traffic.after
    assert value(after, "careservice_cases_open", site="ixs") == 1
    assert value(after, "careservice_cases_open", site="ticketnest") == 0
    assert value(after, "careservice_cases_stuck") == 0
    assert value(after, "careservice_outbound_queue_messages") == 0
    assert value(after, "careservice_outbound_oldest_age_seconds") == 0
    assert value(after, "careservice_relay_up") == 1
    assert value(after, "careservice_worker_up") == 1
    assert [key for key in after if key[0] == "careservice_build_info"] == [
        ("careservice_build_info", (("version", "0.1.0"),))]


def _decoded(page: str) -> str:
    """The page with its data: images decoded, so that a marker inside a chart is found too."""
    images = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)
    assert images
    return page + "".join(base64.b64decode(image).decode() for image in images)


def test_metrics_health_and_stats_hold_nothing_personal(traffic: Traffic) -> None:
    pages = {path: get(traffic.daemon, path).text for path in ("/metrics", "/healthz", "/stats")}
    pages["/stats"] = _decoded(pages["/stats"])
    pages["stats --csv"] = stats_cli(traffic.daemon, "--csv").stdout
    found = [(where, marker) for where, text in pages.items() for marker in traffic.markers
             if marker.lower() in text.lower()]
    assert found == []
    assert "ticketnest" in pages["/stats"] and "careservice_cases_opened_total" in pages["/metrics"]


def test_stats_command_counts_the_day(traffic: Traffic) -> None:
    row = today_row(traffic.daemon, "ticketnest")
    assert {k: row[k] for k in ("opened", "answered", "closed_by_phone", "expired", "replies_refused",
                                "form_accepted", "form_refused", "answered_within_1h", "answered_within_24h")} == {
        "opened": 3, "answered": 1, "closed_by_phone": 1, "expired": 1, "replies_refused": 1, "form_accepted": 1,
        "form_refused": 1, "answered_within_1h": 1.0, "answered_within_24h": 1.0}
    assert 0 < row["median_seconds_to_answer"] <= 300  # within the first band
    assert today_row(traffic.daemon, "ixs")["opened"] == 1
    csv = stats_cli(traffic.daemon, "--csv", "--days", "7").stdout.splitlines()
    assert csv[0].startswith("site,day,opened,answered,closed_by_phone,expired,replies_refused,form_accepted")
    assert len(csv) == 1 + 7 * 2  # every day of the period for both sites
    assert stats_cli(traffic.daemon).returncode == 2  # --json or --csv is required


def test_healthz_follows_the_worker_and_counts_survive_its_restart(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = admin_serving(Daemon(write_config(tmp_path, relay.port)).start())
    try:
        wait_for(lambda: get(daemon, "/healthz").status == 200, what="healthy")
        assert json.loads(get(daemon, "/healthz").text)["checks"]["relay"] == "unknown"  # no mail sent yet
        send(daemon.smtp_port, ALICE, [CARE], customer_mail("One", "one", ALICE))
        wait_for(lambda: relay.to(STAFF) and relay.to(ALICE), what="forward and ack")
        wait_for(lambda: value(scrape(daemon), "careservice_deliveries_total", result="sent") == 3, what="counted")
        assert json.loads(get(daemon, "/healthz").text) == {
            "status": "ok", "checks": {"smtp": "ok", "store": "ok", "worker": "ok", "disk": "ok", "relay": "up"}}
        worker = _worker_pid(daemon)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: get(daemon, "/healthz").status == 503, timeout=10, what="503 after the worker died")
        assert time.monotonic() - killed < 10
        down = json.loads(get(daemon, "/healthz").text)
        assert down["status"] == "failing" and down["failing"] == ["worker"], down
        wait_for(lambda: get(daemon, "/healthz").status == 200, what="200 after the restart")
        assert _worker_pid(daemon) != worker
        assert value(scrape(daemon), "careservice_deliveries_total", result="sent") == 3  # the dead worker's count
        send(daemon.smtp_port, CAROL, [CARE], customer_mail("Two", "two", CAROL))
        wait_for(lambda: relay.to(CAROL), what="ack from the new worker")
        wait_for(lambda: value(scrape(daemon), "careservice_deliveries_total", result="sent") == 6, what="added")
        relay.stop()
        send(daemon.smtp_port, DAVE, [CARE], customer_mail("Three", "relay is gone", DAVE))
        wait_for(lambda: json.loads(get(daemon, "/healthz").text)["status"] == "degraded", what="degraded")
        degraded = get(daemon, "/healthz")
        assert degraded.status == 200 and json.loads(degraded.text)["checks"]["relay"] == "down"
        assert value(scrape(daemon), "careservice_relay_up") == 0
    finally:
        daemon.stop()


def _worker_pid(daemon: Daemon) -> int:
    assert daemon.proc is not None
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(daemon.proc.pid)], capture_output=True, text=True)
    pids = [int(line.split()[0]) for line in out.stdout.splitlines() if " worker " in line]
    assert len(pids) == 1, out.stdout
    return pids[0]


@pytest.mark.imap
def test_an_imap_mailbox_shows_as_its_site_and_folder_only(tmp_path: Path, relay: CaptureRelay,
                                                           dovecot: DovecotServer) -> None:
    daemon = admin_serving(Daemon(imap_config(tmp_path / "svc", relay, dovecot)).start())
    try:
        up = ("careservice_imap_mailbox_up", (("mailbox", "ticketnest/INBOX"),))
        wait_for(lambda: scrape(daemon).get(up) == 1, what="mailbox up")
        dovecot.append(customer_mail("Via IMAP", "imap body", ALICE))
        wait_for(lambda: relay.to(STAFF), what="forward")
        samples = scrape(daemon)
        assert value(samples, "careservice_messages_received_total", channel="imap") == 1
        assert [key for key in samples if key[0] == "careservice_imap_mailbox_up"] == [up]
        assert f"{dovecot.host}:{dovecot.port}" not in get(daemon, "/metrics").text  # the user@host:port name
        dovecot.stop()
        wait_for(lambda: scrape(daemon).get(up) == 0, what="mailbox down")
    finally:
        daemon.stop()


def test_a_token_protected_admin_listener_answers_401_without_it(tmp_path: Path, relay: CaptureRelay) -> None:
    config = write_config(tmp_path, relay.port)
    (tmp_path / "admin.token").write_text("s3cret-admin-token\n")
    config.write_text(config.read_text().replace("[admin]\n", '[admin]\ntoken_file = "admin.token"\n'))
    daemon = admin_serving(Daemon(config).start())
    try:
        for path in ("/metrics", "/healthz", "/stats"):
            for token in ("", "wrong-token"):
                refused = get(daemon, path, token)
                assert refused.status == 401 and refused.headers["www-authenticate"].startswith("Bearer"), path
                assert refused.text == "Unauthorized"
            assert get(daemon, path, "s3cret-admin-token").status == 200, path
    finally:
        daemon.stop()


def test_check_refuses_an_unreadable_token_file_and_a_shared_address(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    text = config.read_text()
    config.write_text(text.replace("[admin]\n", '[admin]\ntoken_file = "missing.token"\n'))
    check = subprocess.run([sys.executable, "-m", "careservice", "check", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and "admin.token_file: cannot read" in check.stderr, check.stderr
    smtp = text.split("[smtp]\nlisten = ")[1].split("\n")[0]
    admin = text.split("[admin]\nlisten = ")[1].split("\n")[0]
    config.write_text(text.replace(f"[admin]\nlisten = {admin}", f"[admin]\nlisten = {smtp}"))
    check = subprocess.run([sys.executable, "-m", "careservice", "check", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and "admin.listen: same address as smtp.listen" in check.stderr, check.stderr


@needs_chromium
def test_stats_page_in_chromium_shows_the_charts(traffic: Traffic) -> None:
    with chromium_page(1200, 1400) as (page, blocked):
        page.goto(f"http://127.0.0.1:{traffic.daemon.admin_port}/stats")
        assert page.title() == "Statistics · careservice"
        charts = page.locator("figure img")
        assert charts.count() == 3  # time to answer, then one per site
        page.wait_for_function("[...document.querySelectorAll('figure img')].every(i => i.naturalWidth > 0)")
        assert [charts.nth(i).evaluate("i => i.naturalWidth") for i in range(3)] == [900, 900, 900]
        assert all(charts.nth(i).get_attribute("alt") for i in range(3))
        assert page.locator("header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(29, 91, 140)"
        answers = page.get_by_role("table", name=re.compile("^Time to answer per site"))
        assert answers.get_by_role("row", name=re.compile(r"^ticketnest \d+ min 100 % 100 % 100 %$")).count() == 1
        page.get_by_text("Site ticketnest: the numbers per day").click()  # opens the table behind the chart
        ticketnest = page.get_by_role("table", name=re.compile("^Site ticketnest per day"))
        # opened, answered, closed by phone, expired, replies refused, form posts accepted and refused
        assert ticketnest.locator("tbody tr").first.locator("td").all_inner_texts()[:7] == [
            "3", "1", "1", "1", "1", "1", "1"]
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert page.evaluate("document.scripts.length") == 0
        assert blocked == []
