"""Mail that reads well, texts per language, the customer's wishes: end to end over SMTP and the form
against the real daemon and the capture relay, and the text lookup itself."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import pytest

from careservice.config import load_config
from careservice.texts import MAIL_TEMPLATES
from careservice.texts import Texts
from careservice.texts import one_prefix
from careservice.texts import sample_values
from careservice.texts import signed
from tests.reliability.mailclients import gmail
from tests.reliability.replycase import reply_address
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
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
from tests.webclient import call
from tests.webclient import serving

CUSTOMER = "alice@customer.example"
IDLE = {"open_cases": 0, "inbound_pending": 0, "outbound_queued": 0, "stuck_cases": 0}


def body(msg: EmailMessage) -> str:
    return msg.get_body(("plain",)).get_content().replace("\r\n", "\n")


def mail_to(relay: CaptureRelay, address: str, count: int, what: str) -> list[EmailMessage]:
    wait_for(lambda: len(relay.to(address)) >= count, what=what)
    return [c.message for c in relay.to(address)]


def test_a_follow_up_threads_to_each_staff_members_first_forward_without_the_quoted_ack(
        daemon: Daemon, relay: CaptureRelay) -> None:
    send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Re: AW: Lost tickets", "Order 4711 is lost"))
    first = mail_to(relay, STAFF, 1, "first forward")[0]
    first2 = mail_to(relay, STAFF2, 1, "second staff member's first forward")[0]
    assert first["Message-ID"] != first2["Message-ID"]  # each copy its own id: a client may drop a repeated one
    assert str(first["Subject"]).endswith("] Re: Lost tickets")  # the customer's prefixes made one
    ack = mail_to(relay, CUSTOMER, 1, "ack")[0]
    quoted = "\n".join("> " + line for line in body(ack).splitlines())
    follow = customer_mail("Re: Re: " + str(ack["Subject"]), f"I forgot: order 4712 too.\n\nOn Monday, TicketNest "
                           f"<{CARE}> wrote:\n{quoted}\n", headers={"In-Reply-To": str(ack["Message-ID"])})
    send(daemon.smtp_port, CUSTOMER, [CARE], follow)
    for staff, own_first in ((STAFF, first), (STAFF2, first2)):
        second = mail_to(relay, staff, 2, "follow-up forward")[1]
        assert second["In-Reply-To"] == own_first["Message-ID"] and second["Message-ID"] != own_first["Message-ID"]
        assert own_first["Message-ID"] in str(second["References"])
        text = body(second)
        assert "I forgot: order 4712 too." in text
        assert "contacting TicketNest" not in text and "wrote:" not in text
        assert not [line for line in text.splitlines() if line.startswith(">")]
        assert "Re: Re:" not in str(second["Subject"])
    assert len(relay.to(CUSTOMER)) == 1  # no second ack
    send(daemon.smtp_port, STAFF, [reply_address(first)], staff_reply(first, "#note She called, all fine."))
    note = mail_to(relay, STAFF2, 3, "note")[2]
    assert "She called, all fine." in body(note) and note["In-Reply-To"] == first2["Message-ID"]


def test_answers_keep_one_prefix_and_one_signature_after_its_separator(daemon: Daemon, relay: CaptureRelay) -> None:
    signatures = {  # what staff wrote below their answer -> the answer's lines from its separator on
        "": ["-- ", "TicketNest Customer Care"],
        "--\nAnna Wombat\nTicketNest Customer Care": ["-- ", "Anna Wombat", "TicketNest Customer Care"],
        "-- \nAnna Wombat": ["-- ", "Anna Wombat", "TicketNest Customer Care"],
    }
    for i, (own, expected) in enumerate(signatures.items()):
        customer = f"c{i}@customer.example"
        send(daemon.smtp_port, customer, [CARE], customer_mail("RE: Re: SV: Refund", "please", sender=customer))
        forward = mail_to(relay, STAFF, i + 1, "forward")[i]
        answer = f"Your refund is on its way.\n\n{own}".rstrip()
        send(daemon.smtp_port, STAFF, [reply_address(forward)], staff_reply(forward, answer))
        wait_for(lambda c=customer: len(relay.to(c)) == 2, what="answer")  # type: ignore[misc]
        sent = relay.to(customer)[1].message
        assert str(sent["Subject"]) == "Re: Refund"
        lines = body(sent).rstrip("\n").split("\n")
        assert lines[0] == "Your refund is on its way." and lines[lines.index("-- "):] == expected, lines
        assert body(sent).count("TicketNest Customer Care") == 1 and "--" not in lines
    shipped = Path(__file__).parent.parent / "templates" / "mail"
    for template in sorted(shipped.rglob("*.txt")):  # one separator at most, with its space
        lines = template.read_text().splitlines()
        assert "--" not in lines and lines.count("-- ") <= 1, template
    wait_for(lambda: daemon.status() == IDLE, what="answered cases purged")
    assert files_containing(daemon.data_dir, [b"Anna Wombat", b"c0@customer"]) == []


def test_an_html_answer_whose_signature_holds_the_teams_has_it_once_in_both_parts(daemon: Daemon,
                                                                                  relay: CaptureRelay) -> None:
    send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Refund", "please"))
    forward = mail_to(relay, STAFF, 1, "forward")[0]
    text = "Your refund is on its way.\n\n-- \nAnna Wombat\nTicketNest Customer Care"
    html = "<div>Your refund is on its way.</div><div><br></div><div>-- </div><div>Anna Wombat<br>TicketNest " \
           "Customer Care</div>"
    send(daemon.smtp_port, STAFF, [reply_address(forward)], gmail(forward, text, html=html))
    wait_for(lambda: len(relay.to(CUSTOMER)) == 2, what="answer")
    answer = relay.to(CUSTOMER)[1].message
    for kind in ("plain", "html"):
        part = answer.get_body((kind,)).get_content()
        assert "Anna Wombat" in part and part.count("TicketNest Customer Care") == 1, (kind, part)


def test_notices_are_threaded_to_the_staff_reply_and_wrapped_at_72(daemon: Daemon, relay: CaptureRelay) -> None:
    send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Tickets", "where are they"))
    forward = mail_to(relay, STAFF, 1, "forward")[0]
    for i, text in enumerate(("#help", "")):  # the list of commands; an empty reply
        reply = staff_reply(forward, text)
        send(daemon.smtp_port, STAFF, [reply_address(forward)], reply)
        notice = mail_to(relay, STAFF, i + 2, "notice")[i + 1]
        sent_id = f"<{reply.split(b'Message-ID: <')[1].split(b'>')[0].decode()}>"
        assert notice["In-Reply-To"] == sent_id and sent_id in str(notice["References"])
        assert forward["Message-ID"] in str(notice["References"])  # the staff reply's own thread, kept
        long = [line for line in body(notice).splitlines() if len(line) > 72]
        assert long == [], long
    assert "#assign <name>: hand the case to one staff member" in body(relay.to(STAFF)[1].message)


def test_a_german_form_post_gets_german_pages_and_ack_and_asks_for_a_call(daemon: Daemon, relay: CaptureRelay) -> None:
    serving(daemon)
    german = {"Accept-Language": "fr-CH, de-DE;q=0.9, en;q=0.5"}  # no French texts: German is the best there is
    form = call(daemon.web_port, "GET", "/ticketnest/contact", headers=german)
    assert '<html lang="de">' in form.text and "Ihr Anliegen <span" in form.text
    assert "Telefon <span class=\"tag unless-chosen\">(freiwillig)</span><span class=\"tag if-chosen\">" \
           "(Pflichtfeld)</span>" in form.text
    fields = {"name": "Zoë Müller", "email": "zoe@customer.example", "telephone": "+49 30 123456",
              "preferred_contact": "telephone", "query": "Wo sind meine Karten für das Konzert am Samstag in Berlin?"}
    missing = call(daemon.web_port, "POST", "/ticketnest/contact", {**fields, "telephone": ""}, german)
    assert missing.status == 400 and "Pflichtfeld, wenn wir Sie anrufen sollen" in missing.text
    posted = call(daemon.web_port, "POST", "/ticketnest/contact", fields, german)
    assert posted.status == 303
    thanks = call(daemon.web_port, "GET", posted.headers["location"], headers=german)
    assert "<h1>Vielen Dank</h1>" in thanks.text and "Wir speichern keinerlei Daten" in thanks.text
    ack = mail_to(relay, "zoe@customer.example", 1, "ack")[0]
    assert str(ack["Subject"]).startswith("Ihre Nachricht ist angekommen (TicketNest, Vorgang ")
    assert ack["Content-Language"] == "de"
    assert "ruft Sie jemand aus unserem Team an, unter der Nummer\n+49 30 123456." in body(ack)
    assert body(ack).rstrip("\n").endswith("\n-- \nIhr Kundenservice von TicketNest")
    forward = mail_to(relay, STAFF, 1, "forward")[0]
    assert str(forward["Subject"]).endswith("] TicketNest: Wo sind meine Karten für das Konzert …")
    assert body(forward).startswith("PLEASE CALL: the customer asks to be called at +49 30 123456.\n")  # site's en
    send(daemon.smtp_port, STAFF, [reply_address(forward)], staff_reply(forward, "#closed"))
    wait_for(lambda: daemon.status() == IDLE, what="case closed by phone")
    assert files_containing(daemon.data_dir, [b"Konzert", b"123456", b"Zo\xc3\xab"]) == []


@pytest.mark.parametrize(("language", "subject"), [("de-DE", "Ihre Nachricht ist angekommen"),
                                                    ("fr", "We received your message")])
def test_a_mail_in_german_gets_a_german_ack(daemon: Daemon, relay: CaptureRelay, language: str, subject: str) -> None:
    raw = customer_mail("Karten", "Wo sind sie?")  # its set_content drops Content-* headers given before
    send(daemon.smtp_port, CUSTOMER, [CARE], f"Content-Language: {language}\r\n".encode() + raw)
    ack = mail_to(relay, CUSTOMER, 1, "ack")[0]
    assert str(ack["Subject"]).startswith(subject)
    assert ack["Content-Language"] == language[:2].replace("fr", "en")  # no French texts: the site's language
    assert "A member of our team will answer you soon." in body(ack) or "antwortet Ihnen in Kürze" in body(ack)
    forward = mail_to(relay, STAFF, 1, "forward")[0]
    assert "New message for TicketNest" in body(forward) and "PLEASE CALL" not in body(forward)


def test_texts_fall_back_by_language_then_site_then_package(tmp_path: Path) -> None:
    override = tmp_path / "overrides"
    (override / "mail" / "de" / "ixs").mkdir(parents=True)
    (override / "mail" / "de" / "ixs" / "ack.txt").write_text("Subject: ixs auf Deutsch\n{{ site.name }}\n")
    (override / "mail" / "en").mkdir(parents=True)
    (override / "mail" / "en" / "note.txt").write_text("Subject: our note\n{{ text }}\n")
    config = with_lines(write_config(tmp_path, 1), "service", f'templates_dir = "{override}"')
    config.write_text(config.read_text().replace('id = "ixs"\n', 'id = "ixs"\nlanguage = "de"\n'))
    loaded = load_config(config)
    texts = Texts(loaded.templates_dir, loaded.sites)
    ixs, nest = loaded.site("ixs"), loaded.site("ticketnest")
    assert ixs is not None and nest is not None and texts.languages == {"de", "en"}
    contact = {"contact": {"preferred_contact": "email", "telephone": ""}, "case_id": "c"}
    assert texts.mail("ixs", "ack", "de", site=ixs, **contact)[0] == "ixs auf Deutsch"  # per-site override
    assert texts.mail("ixs", "ack", "fr", site=ixs, **contact)[0] == "ixs auf Deutsch"  # the site's language
    assert texts.mail("ticketnest", "ack", "de", site=nest, **contact)[0].startswith("Ihre Nachricht")  # packaged
    assert texts.mail("ticketnest", "ack", "", site=nest, **contact)[0].startswith("We received")
    assert texts.mail("ixs", "note", site=ixs, case_id="c", subject="", author="a", text="t")[0].startswith("[ixs")
    assert texts.mail("ixs", "note", "en", site=ixs, case_id="c", subject="", author="a", text="t")[0] == "our note"
    forward = texts.mail("ixs", "forward", site=ixs, case_id="c", subject="", text="t", follow_up=False,
                         contact={"name": "", "email": "", "company": "", "address": "", "telephone": "+1 5",
                                  "fax": "", "preferred_contact": "telephone"})[1]
    assert forward.startswith("BITTE ANRUFEN:") and "Gewünschter Kontaktweg: Telefon" in forward  # staff: site's
    assert all(not texts.check(site) for site in loaded.sites)
    assert texts.choose(["fr", "de", "en"]) == "de" and texts.choose(["fr"]) == ""


def test_check_covers_every_language_and_names_texts_out_of_place(tmp_path: Path) -> None:
    override = tmp_path / "overrides"
    (override / "web" / "de").mkdir(parents=True)
    (override / "web" / "de" / "thanks.html").write_text(
        "{% extends 'web/de/base.html' %}{% block content %}{{ nothing.here }}{% endblock %}")
    (override / "mail" / "ixs").mkdir(parents=True)
    (override / "mail" / "ixs" / "ack.txt").write_text("Subject: old layout\n")
    (override / "mail" / "en").mkdir(parents=True)
    (override / "mail" / "en" / "answer.txt").write_text("Subject: Re: {{ subject }}\n{{ text }}\n\n--\nUs\n")
    config = with_lines(write_config(tmp_path, 1), "service", f'templates_dir = "{override}"')
    config.write_text(config.read_text().replace('id = "ixs"\n', 'id = "ixs"\nlanguage = "fr"\n'))
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    assert "web/de/thanks.html" in result.stderr  # German is checked, though both sites default to others
    assert "service.templates_dir: mail/ixs/ack.txt is never used" in result.stderr
    assert 'sites[1].language: no texts in "fr"' in result.stderr
    assert "mail/en/answer.txt" in result.stderr and '"-- "' in result.stderr


def test_subject_prefixes_and_signatures() -> None:
    assert [one_prefix(s) for s in ("Re: Re: x", "AW: WG: x", "Fwd: RE : x", "[B #1] Re: SV: Re[2]: x", "Reply x")] \
        == ["Re: x", "Re: x", "Fwd: x", "[B #1] Re: x", "Reply x"]
    assert signed("Thanks\n--\nAnna", "Team") == "Thanks\n-- \nAnna\nTeam"
    assert signed("Thanks\n\nTeam", "Team") == "Thanks\n\nTeam"
    assert signed("Thanks", "The  Team") == "Thanks\n\n-- \nThe  Team"


def test_every_shipped_mail_text_keeps_to_72_columns(tmp_path: Path) -> None:
    loaded = load_config(write_config(tmp_path, 1))
    texts = Texts(None, loaded.sites)
    site = loaded.sites[0]
    for language in texts.languages:
        for name in MAIL_TEMPLATES:
            subject, text = texts.mail(site.id, name, language, **sample_values("mail", name, site))
            assert [line for line in text.splitlines() if len(line) > 72] == [], (language, name)
