"""PostgreSQL going away under load and coming back: the intake answers 451 4.3.0 and the form 503
meanwhile, nothing already answered 250 is lost, and the node goes on by itself afterwards."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

from careservice.settings import StoreConfig
from tests.postgres import Postgres
from tests.postgres import with_store
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import wait_for
from tests.support import write_config
from tests.test_admin import get
from tests.test_admin import scrape
from tests.test_admin import value
from tests.webclient import VALID
from tests.webclient import post

OUTAGE = 3.0  # seconds the database is away


class Load:
    """A sender that keeps offering numbered mails, retrying each after a 4xx as an MTA would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: list[str] = []
        self.refusals: list[str] = []  # the 4xx replies seen
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            subject = f"outage-{n}"
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                    client.sendmail("load@customer.example", [CARE], customer_mail(subject, "body",
                                                                                   sender="load@customer.example"))
                self.accepted.append(subject)
                n += 1
            except smtplib.SMTPResponseException as exc:
                self.refusals.append(f"{exc.smtp_code} {exc.smtp_error.decode()}")
                time.sleep(0.2)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.2)
            time.sleep(0.05)


def forwarded_subjects(relay: CaptureRelay) -> set[str]:
    return {str(c.message["Subject"]).rsplit(" ", 1)[-1] for c in relay.to(STAFF)}


def test_a_database_restart_during_load_loses_nothing(tmp_path: Path, relay: CaptureRelay, postgres: Postgres,
                                                     pg_store: StoreConfig) -> None:
    daemon = Daemon(with_store(write_config(tmp_path, relay.port), pg_store)).start()
    load = Load(daemon.smtp_port)
    try:
        load.thread.start()
        wait_for(lambda: len(load.accepted) >= 10, what="mail accepted before the outage")
        postgres.stop()
        try:
            wait_for(lambda: any(r.startswith("451 4.3.0") for r in load.refusals), what="451 during the outage")
            form = post(daemon, VALID)
            assert form.status == 503 and "try" in form.text and "again" in form.text
            health = get(daemon, "/healthz")
            assert health.status == 503 and '"store":"not_writable"' in health.text.replace(" ", "")
            time.sleep(OUTAGE)
        finally:
            postgres.start()
        during = len(load.accepted)
        wait_for(lambda: len(load.accepted) >= during + 10, timeout=60, what="mail accepted again")
        load.stop.set()
        load.thread.join(40)
        assert post(daemon, VALID).status == 303  # the form takes messages again
        wait_for(lambda: set(load.accepted) <= forwarded_subjects(relay), timeout=60, what="every 250 forwarded")
        # the node's health and metrics read the cluster's store again
        assert get(daemon, "/healthz").status == 200
        opened = len(load.accepted) + 1  # and the form message taken after the outage
        wait_for(lambda: value(scrape(daemon), "careservice_cases_open", site="ticketnest") == opened,
                 what="open cases in the node's metrics")
        stats = subprocess.run([sys.executable, "-m", "careservice", "stats", "--json", "--config", str(daemon.config)],
                               capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0 and '"ticketnest"' in stats.stdout, stats.stderr
    finally:
        load.stop.set()
        daemon.stop()
