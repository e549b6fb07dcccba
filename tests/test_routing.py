"""Routing end to end over SMTP and the form: [[sites.routes]] send a case to their own staff (first match
wins, else the site's staff), round robin hands cases out in turn, and the config names bad keys."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from careservice.addresses import Addressing
from careservice.config import ConfigError
from careservice.config import Site
from careservice.config import load_config
from careservice.configroutes import pattern
from careservice.context import Inputs
from careservice.crypto import Keyring
from careservice.crypto import load_master_key
from careservice.mail import Parsed
from careservice.model import Case
from careservice.model import CaseState
from careservice.model import Envelope
from careservice.model import Inbound
from careservice.model import Source
from careservice.routing import route_new_case
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import Captured
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import with_routes
from tests.support import write_config
from tests.test_workflow import CUSTOMER
from tests.test_workflow import answer_to
from tests.webclient import VALID
from tests.webclient import behind_proxy
from tests.webclient import post
from tests.webclient import serving

REFUNDS, SALES, VIP = "refunds@staff.example", "sales@staff.example", "vip@staff.example"
ROTA = ("anna@staff.example", "ben@staff.example", "cleo@staff.example")
ROUTES = with_routes(f"""
[[sites.routes]]
match_recipient = "refunds@ticketnest.test"
staff = ["{REFUNDS}"]
[[sites.routes]]
match_subject = "(?i)refund|cancel"
staff = ["{SALES}"]
[[sites.routes]]
match_recipient = "vip@ticketnest.test"
match_subject = "(?i)urgent"
staff = ["{VIP}"]
""")
ROUND_ROBIN = f"""
[[sites.routes]]
match_subject = "(?i)refund"
staff = {list(ROTA)!r}
assign = "round_robin"
""".replace("'", '"')


def forwards(relay: CaptureRelay, subject: str) -> list[Captured]:
    """The forwards (not notices or reminders) of the case whose customer subject is `subject`."""
    return [c for c in relay.received if str(c.message["Subject"]).endswith(f"] {subject}")]


def open_routed(daemon: Daemon, relay: CaptureRelay, subject: str, to: str = CARE) -> list[str]:
    """Send a customer mail to `to`; the staff addresses its forwards went to."""
    send(daemon.smtp_port, CUSTOMER, [to], customer_mail(subject, f"About: {subject}", sender=CUSTOMER))
    wait_for(lambda: forwards(relay, subject), what=f"forward of {subject!r}")
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="queue drained")
    return sorted(address for c in forwards(relay, subject) for address in c.rcpt_tos)


def test_routes_by_recipient_and_subject_first_match_wins_else_the_site_staff(tmp_path: Path,
                                                                             relay: CaptureRelay) -> None:
    daemon = serving(Daemon(behind_proxy(write_config(tmp_path, relay.port, sites=ROUTES))).start())
    try:
        assert open_routed(daemon, relay, "Where is my order", to="refunds@ticketnest.test") == [REFUNDS]
        assert open_routed(daemon, relay, "Please CANCEL it", to="refunds@ticketnest.test") == [REFUNDS]  # first wins
        assert open_routed(daemon, relay, "Refund for order 4711") == [SALES]
        assert open_routed(daemon, relay, "Lost tickets") == [STAFF, STAFF2]  # no route matches
        assert open_routed(daemon, relay, "Hello", to="vip@ticketnest.test") == [STAFF, STAFF2]  # not both keys
        assert open_routed(daemon, relay, "URGENT: seats", to="vip@ticketnest.test") == [VIP]
        with pytest.raises(smtplib.SMTPRecipientsRefused):  # only configured addresses are taken
            send(daemon.smtp_port, CUSTOMER, ["sales@ticketnest.test"], customer_mail("x", "y"))
        # a form post has our own subject: its query text is matched instead
        assert post(daemon, {**VALID, "query": "I want to cancel my order 4711."}).status == 303
        wait_for(lambda: any("cancel my order" in c.raw.decode() for c in relay.to(SALES)), what="routed form post")
        assert not any("cancel my order" in c.raw.decode() for c in relay.to(STAFF))
        # the route's staff member answers their forward: the customer gets it and the case is gone
        [forward] = forwards(relay, "Refund for order 4711")
        send(daemon.smtp_port, SALES, [forward.message["Reply-To"].addresses[0].addr_spec],
             staff_reply(forward.message, "Your refund is on its way.", sender=SALES))
        wait_for(lambda: any("refund is on its way" in c.raw.decode() for c in answer_to(relay)), what="answer")
        wait_for(lambda: daemon.status()["open_cases"] == 6, what="the answered case purged")
        assert files_containing(daemon.data_dir, [b"Refund for order 4711"]) == []
    finally:
        daemon.stop()


def test_an_answer_the_relay_refuses_is_told_to_the_routes_staff_not_the_sites(tmp_path: Path,
                                                                              relay: CaptureRelay) -> None:
    daemon = Daemon(write_config(tmp_path, relay.port, sites=ROUTES)).start()
    try:
        assert open_routed(daemon, relay, "Where is my order", to="refunds@ticketnest.test") == [REFUNDS]
        [forward] = forwards(relay, "Where is my order")
        relay.replies = ["554 5.7.1 recipient refused"]  # the answer, for good
        send(daemon.smtp_port, REFUNDS, [forward.message["Reply-To"].addresses[0].addr_spec],
             staff_reply(forward.message, "Your order ships today.", sender=REFUNDS))
        failed = lambda: [c for c in relay.received if "not be delivered" in str(c.message["Subject"])]  # noqa: E731
        wait_for(failed, what="the notice of the refused answer")
        wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="every notice delivered")
        assert [c.rcpt_tos for c in failed()] == [[REFUNDS]]  # the route's staff, not STAFF or STAFF2
        assert answer_to(relay) == []
        # the notice's reply address answers the case again; this time the relay takes it
        [notice] = failed()
        send(daemon.smtp_port, REFUNDS, [notice.message["Reply-To"].addresses[0].addr_spec],
             staff_reply(notice.message, "Your order ships today.", sender=REFUNDS))
        wait_for(lambda: answer_to(relay), what="the second answer")
        wait_for(lambda: daemon.status()["open_cases"] == 0, what="the answered case purged")
        assert files_containing(daemon.data_dir, [b"Where is my order"]) == []
    finally:
        daemon.stop()


def reply_address_for(config: Path, forward: Captured, staff: str) -> str:
    """The reply address of the forward's case signed for `staff` (as a note or digest would issue it)."""
    loaded = load_config(config)
    token = forward.message["Reply-To"].addresses[0].addr_spec.split("@")[0].split("+")[1]
    case_id, nonce, _ = token.split(".")
    addressing = Addressing(loaded.sites, Keyring(load_master_key(loaded.master_key_file, create=False)))
    return addressing.reply_address(loaded.sites[0], case_id, nonce, staff)


def paused_worker(daemon: Daemon) -> int:
    """Stop the daemon's worker process (SIGSTOP) and return its pid; the intake keeps committing."""
    assert daemon.proc is not None
    for pid in Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text().split():
        if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(int(pid), signal.SIGSTOP)
            return int(pid)
    raise AssertionError("no worker process")


def test_round_robin_hands_cases_out_in_turn_and_reminds_only_the_owner(tmp_path: Path, relay: CaptureRelay) -> None:
    config = write_config(tmp_path, relay.port, sites=with_routes(ROUND_ROBIN),
                          extra='[retention]\nremind_after = ["6s"]')
    daemon = Daemon(config).start()
    try:
        worker = paused_worker(daemon)
        try:  # all four wait in the store, so the worker takes them in one batch: they must still take turns
            for n in range(1, 5):
                send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail(f"Refund {n}", "please", sender=CUSTOMER))
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_for(lambda: all(forwards(relay, f"Refund {n}") for n in range(1, 5)), what="four forwards")
        owners = [[a for c in forwards(relay, f"Refund {n}") for a in c.rcpt_tos] for n in range(1, 5)]
        assert owners == [[ROTA[0]], [ROTA[1]], [ROTA[2]], [ROTA[0]]]
        reminders = lambda: [c for c in relay.received if "Reminder" in str(c.message["Subject"])]  # noqa: E731
        wait_for(lambda: len(reminders()) == 4, what="a reminder per case")
        assert sorted(a for c in reminders() for a in c.rcpt_tos) == sorted([*ROTA, ROTA[0]])
        for n, owner in ((1, ROTA[0]), (2, ROTA[1])):
            [mine] = [c for c in reminders() if forwards(relay, f"Refund {n}")[0].message["Subject"].split("]")[0]
                      in str(c.message["Subject"])]
            assert mine.rcpt_tos == [owner]
        # a colleague on the route may answer the owner's case, from a reply address issued to them...
        [first] = forwards(relay, "Refund 1")
        send(daemon.smtp_port, ROTA[1], [first.message["Reply-To"].addresses[0].addr_spec],  # ...not the owner's
             staff_reply(first.message, "Refund sent by Ben.", sender=ROTA[1]))
        wait_for(lambda: "reply_other_staff" in daemon.log.read_text(), what="refusal of the owner's address")
        own = reply_address_for(config, first, ROTA[1])
        send(daemon.smtp_port, ROTA[1], [own],
             staff_reply(first.message, "Refund sent by Ben.", sender=ROTA[1], to=own))
        wait_for(lambda: len(answer_to(relay)) == 1, what="the colleague's answer")
        assert "Refund sent by Ben." in answer_to(relay)[0].raw.decode()
        wait_for(lambda: daemon.status()["open_cases"] == 3, what="the answered case purged")
    finally:
        daemon.stop()
    # the turn survives a restart: the next case goes to the second staff member
    daemon = Daemon(config).start()
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Refund 5", "please", sender=CUSTOMER))
        wait_for(lambda: forwards(relay, "Refund 5"), what="fifth forward")
        assert forwards(relay, "Refund 5")[0].rcpt_tos == [ROTA[1]]
    finally:
        daemon.stop()


@pytest.mark.parametrize(("route", "extra", "key", "problem"), [
    ('match_subject = "(a)\\\\1"', "", "sites[0].routes[1].match_subject", "not a pattern RE2 can run"),
    ('match_subject = "(?<=x)y"', "", "sites[0].routes[1].match_subject", "not a pattern RE2 can run"),
    ('match_subject = "x"\nassign = "random"', "", "sites[0].routes[1].assign", "expected one of all, round_robin"),
    ('match_subjet = "x"', "", "sites[0].routes[1].match_subjet", 'did you mean "match_subject"'),
    ('staff = ["b@staff.example"]', "", "sites[0].routes[1]", "needs match_recipient or match_subject"),
    ('match_subject = "(?i)refund"', "", "sites[0].routes[1]", "matches as sites[0].routes[0] does"),
    ('match_recipient = "care+x@ticketnest.test"', "", "sites[0].routes[1].match_recipient", 'must not contain "+"'),
    ('match_recipient = "care@ixs.test"', "", "sites[0].routes[1].match_recipient", "is also sites[1].care_address"),
    ('match_subject = "x"', '[digest]\nat = "25:00"', "digest.at", 'expected a local time such as "08:00"'),
    ('match_subject = "x"', '[digest]\nat = "8am"', "digest.at", 'expected a local time such as "08:00"'),
])
def test_config_errors_name_the_key(tmp_path: Path, route: str, extra: str, key: str, problem: str) -> None:
    second = "" if "staff =" in route else '\nstaff = ["b@staff.example"]'
    sites = with_routes(ROUND_ROBIN + f"[[sites.routes]]\n{route}{second}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, 1, sites=sites, extra=extra))
    assert raised.value.key == key and problem in str(raised.value)


def test_check_passes_with_routes_and_a_digest(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1, sites=ROUTES, extra='[digest]\nat = "08:00"')
    loaded = load_config(config)
    assert [r.assign for r in loaded.sites[0].routes] == ["all"] * 3 and loaded.digest_at is not None
    result = subprocess.run([sys.executable, "-m", "careservice", "check", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "digest     daily at 08:00 local time" in result.stdout and "routes=3" in result.stdout


def routed(site: Site, source: Source, rcpt: str, subject: str) -> str:
    """The route id route_new_case gives a new case ("" = the site's staff), as the NEW stage sees it."""
    case = Case("c0ffee000001", site.id, CaseState.NEW, 0.0, "0a1b2c3d", Inbound(source, Envelope(CUSTOMER, rcpt), b""))
    parsed = Parsed(subject=subject, text="query text")
    return route_new_case(Inputs(case, site, parsed, None, 0.0))[0].route


def test_imap_matches_the_recorded_recipient_and_a_hostile_subject_is_matched_in_linear_time(tmp_path: Path) -> None:
    site = load_config(write_config(tmp_path, 1, sites=ROUTES)).sites[0]
    refunds, sales, vip = (route.id for route in site.routes)
    # from a mailbox, the recipient its provider recorded (the topmost Delivered-To: intake.headers)
    assert routed(site, Source.IMAP, "Refunds@TicketNest.test", "hi") == refunds
    assert routed(site, Source.IMAP, "vip@ticketnest.test", "URGENT") == vip
    assert routed(site, Source.SMTP, CARE, "hi") == ""
    assert routed(site, Source.WEB, CARE, "Refund") == ""  # a form post: its query text, not our subject
    # "(a+)+$" backtracks exponentially in Python's re; RE2 answers at once (the test would hang otherwise)
    hostile = replace(site, routes=(replace(site.routes[1], match_subject=pattern("k", "(a+)+$")),))
    assert routed(hostile, Source.SMTP, CARE, "a" * 3999 + "!") == ""
    assert routed(hostile, Source.SMTP, CARE, "a" * 100_000 + "!") == sales  # only the first 4000 characters count
