"""Notices to staff in the site's language: each notice's words are a template per language,
templates/mail/<language>/notices/<key>.txt, in the frame notice.txt. End to end over SMTP for a German
site, overrides file by file, and `check` rendering every notice in every language."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from careservice.config import load_config
from careservice.texts import NOTICES
from careservice.texts import Texts
from careservice.texts import packaged_templates
from careservice.texts import sample_values
from tests.support import SITES
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import files_containing
from tests.support import send
from tests.support import staff_reply
from tests.support import wait_for
from tests.support import write_config
from tests.test_check import cli
from tests.test_check import with_lines
from tests.test_reads_well import IDLE
from tests.test_reads_well import body
from tests.test_workflow import CUSTOMER
from tests.test_workflow import answer_to
from tests.test_workflow import open_case

GERMAN = SITES.replace('name = "TicketNest"\n', 'name = "TicketNest"\nlanguage = "de"\n', 1)
ENGLISH = ("Nothing was sent", "The commands are", "Start the first line", "automatic notice", "this list")


@pytest.fixture
def german(tmp_path: Path, relay: CaptureRelay) -> Iterator[Daemon]:
    with Daemon(write_config(tmp_path, relay.port, sites=GERMAN)) as daemon:
        yield daemon


def test_a_german_sites_staff_get_german_notices(german: Daemon, relay: CaptureRelay) -> None:
    forward = open_case(german, relay, customer_mail("Karten", "Wo sind meine Karten für Samstag?"))
    address = forward["Reply-To"].addresses[0].addr_spec
    expected = [  # the reply's text -> the notice's subject and words
        ("", "Ihre Antwort war leer, nichts wurde gesendet",
         "An die Kundschaft wurde nichts gesendet, der Vorgang bleibt offen."),
        ("#clossed", "Unbekannter Befehl, nichts wurde gesendet", "#help: diese Liste"),
        ("#help", "Befehle", "#assign <Name>: übergibt den Vorgang an eine Person aus dem Team"),
    ]
    for i, (text, subject, words) in enumerate(expected):
        send(german.smtp_port, STAFF, [address], staff_reply(forward, text))
        wait_for(lambda n=i + 2: len(relay.to(STAFF)) >= n, what=f"notice for {text!r}")  # type: ignore[misc]
        notice = relay.to(STAFF)[i + 1].message
        assert str(notice["Subject"]).endswith(f"] {subject}"), notice["Subject"]
        assert notice["Auto-Submitted"] == "auto-replied"
        text_of = body(notice)
        assert " ".join(words.split()) in " ".join(text_of.split()), text_of
        assert "Dies ist eine automatische Mitteilung von careservice." in text_of
        assert [w for w in ENGLISH if w in text_of] == [], text_of
        assert [line for line in text_of.splitlines() if len(line) > 72] == []
        assert "Samstag" not in text_of and CUSTOMER not in text_of  # the case id only
    assert answer_to(relay) == [] and german.status()["open_cases"] == 1
    send(german.smtp_port, STAFF, [address], staff_reply(forward, "#closed"))
    wait_for(lambda: german.status() == IDLE, what="case closed by phone")
    assert files_containing(german.data_dir, [b"Samstag", CUSTOMER.encode()]) == []


def test_every_notice_has_its_words_in_every_shipped_language(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, 1, sites=GERMAN))
    texts = Texts(None, config.sites)
    site = config.sites[0]
    worded: dict[str, set[str]] = {}
    for language in sorted(texts.languages):
        for key in NOTICES:
            name = f"notices/{key}"
            assert (packaged_templates() / "mail" / language / f"{name}.txt").is_file(), (language, key)
            subject, text = texts.mail(site.id, name, language, **sample_values("mail", name, site))
            worded.setdefault(language, set()).add(subject)
            assert subject.startswith("[TicketNest #0123456789ab] ") and text.split("\n\n")[1].strip(), (language, key)
    assert worded["en"].isdisjoint(worded["de"])  # translated, not copied
    assert texts.mail(site.id, "notices/reply_empty", site=site, case_id="c")[0].endswith("Ihre Antwort war leer, "
                                                                                         "nichts wurde gesendet")


def test_a_notice_is_overridden_file_by_file_and_check_names_a_broken_one(tmp_path: Path) -> None:
    override = tmp_path / "overrides"
    files = {
        "mail/de/notices/reply_empty.txt": "Subject: Leer!\nNichts zu senden, Vorgang {{ case_id }}.\n",
        "mail/de/notice.txt": "Subject: [{{ site.name }}] {{ headline }}\n{{ explanation }}\n-- \nIhr Team\n",
        "mail/en/notices/expired.txt": "Subject: Gone\nAfter {{ dayz }} days.\n",
        "mail/de/notices/help.txt": "No subject line\n",
    }
    for name, text in files.items():
        (override / name).parent.mkdir(parents=True, exist_ok=True)
        (override / name).write_text(text)
    config = with_lines(write_config(tmp_path, 1, sites=GERMAN), "service", f'templates_dir = "{override}"')
    loaded = load_config(config)
    texts = Texts(loaded.templates_dir, loaded.sites)
    site = loaded.sites[0]
    # the overridden notice, in the overridden frame (which kept the frame's values: headline, explanation)
    assert texts.mail(site.id, "notices/reply_empty", site=site, case_id="c1") == (
        "[TicketNest] Leer!", "Nichts zu senden, Vorgang c1.\n-- \nIhr Team\n")
    subject, text = texts.mail(site.id, "notices/reply_late", site=site, case_id="c1")  # the package's words
    assert subject == "[TicketNest] Bereits beantwortet, nichts gesendet" and "Daten sind gelöscht" in text
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    problems = result.stderr.splitlines()
    assert [p for p in problems if "mail/en/notices/expired.txt" in p and "dayz" in p]
    assert [p for p in problems if "mail/de/notices/help.txt" in p and "Subject" in p]
    assert not [p for p in problems if "reply_empty" in p or "mail/de/notice.txt" in p]


def test_check_renders_every_notice_in_every_language(tmp_path: Path) -> None:
    override = tmp_path / "overrides"
    for language in ("en", "de"):
        for key in NOTICES:
            path = override / "mail" / language / "notices" / f"{key}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("Subject: x\n{{ not_a_value }}\n")
    config = with_lines(write_config(tmp_path, 1, sites=GERMAN), "service", f'templates_dir = "{override}"')
    result = cli("check", "--config", str(config))
    named = {re.search(r"mail/\w+/notices/\w+\.txt", line).group(0)  # type: ignore[union-attr]
             for line in result.stderr.splitlines() if "not_a_value" in line}
    assert named == {f"mail/{language}/notices/{key}.txt" for language in ("en", "de") for key in NOTICES}
    clean = cli("check", "--config", str(write_config(tmp_path / "clean", 1, sites=GERMAN)))
    assert clean.returncode == 0, clean.stderr
