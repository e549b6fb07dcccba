"""The contact form over real HTTP against the daemon: fields, verification code, limits, privacy."""

from __future__ import annotations

import base64
import html
import http.client
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from careservice.intake.formguard import CodeTokens
from tests.support import CARE
from tests.support import STAFF
from tests.support import STAFF2
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import files_containing
from tests.support import wait_for
from tests.support import write_config
from tests.webclient import CUSTOMER
from tests.webclient import VALID
from tests.webclient import behind_proxy
from tests.webclient import call
from tests.webclient import committed
from tests.webclient import keeping_nothing
from tests.webclient import post
from tests.webclient import serving
from tests.webclient import start
from tests.webclient import tokens


@pytest.fixture
def config(tmp_path: Path, relay: CaptureRelay) -> Path:
    return behind_proxy(write_config(tmp_path, relay.port))


@pytest.fixture
def daemon(daemon: Daemon) -> Daemon:
    return serving(daemon)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests that send only refused submissions."""
    yield from keeping_nothing(tmp_path_factory.mktemp("shared"))


@pytest.fixture
def coded(tmp_path: Path, relay: CaptureRelay) -> Iterator[Daemon]:
    """A daemon with the image verification code on."""
    daemon = start(tmp_path, relay, 'verification = "off"', 'verification = "image"')
    try:
        yield daemon
    finally:
        daemon.stop()


# ----- the page -----


def test_form_page_fields_labels_and_headers(shared: Daemon) -> None:
    page = call(shared.web_port, "GET", "/ticketnest/contact")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "script-src 'none'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'<style nonce="{nonce.group(1)}">' in page.text
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "set-cookie" not in page.headers and "server" not in page.headers
    assert "strict-transport-security" not in page.headers  # plain HTTP: HSTS only when we serve TLS
    for name in ("name", "email", "company", "address", "telephone", "fax", "query"):
        assert f'<label for="{name}">' in page.text and f'id="{name}" name="{name}"' in page.text
    for required in ("name", "email", "query"):
        assert re.search(rf'id="{required}" name="{required}"[^>]* required', page.text)
    assert 'name="preferred_contact" value="email" checked' in page.text
    assert 'name="preferred_contact" value="telephone"' in page.text
    assert re.search(r'<div class="trap" aria-hidden="true">.*?name="website"', page.text, re.S)
    assert "<script" not in page.text and "http://" not in page.text and "https://" not in page.text
    assert "code_token" not in page.text and "verification_code" not in page.text  # verification = "off"
    assert "Contact TicketNest customer care" in page.text


def test_brand_per_site(daemon: Daemon, relay: CaptureRelay) -> None:
    page = call(daemon.web_port, "GET", "/ixs/contact")
    assert "Contact ixs customer care" in page.text and "TicketNest" not in page.text
    assert 'action="/ixs/contact"' in page.text
    reply = post(daemon, VALID, site="ixs")
    assert (reply.status, reply.headers["location"]) == (303, "/ixs/contact/thanks")
    thanks = call(daemon.web_port, "GET", "/ixs/contact/thanks")
    assert thanks.status == 200 and "reached ixs customer care" in thanks.text and "TicketNest" not in thanks.text
    wait_for(lambda: relay.to(STAFF), what="forward")
    forward = relay.to(STAFF)[0]
    assert forward.rcpt_tos == [STAFF] and forward.mail_from == "care@ixs.test"
    assert str(forward.message["From"]) == "Zoë Müller via ixs <care@ixs.test>"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/nosuch/contact"), ("POST", "/nosuch/contact"), ("GET", "/nosuch/contact/thanks"),
    ("GET", "/ticketnest/other"), ("GET", "/"), ("GET", "/ticketnest/contact/code.png?t=x"),
])
def test_unknown_site_or_path_is_404(shared: Daemon, method: str, path: str) -> None:
    reply = call(shared.web_port, method, path, VALID if method == "POST" else None)
    assert reply.status == 404
    assert reply.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in reply.headers
    assert committed(shared) == 0


# ----- a valid submission -----


def test_submission_reaches_staff_with_every_field_and_no_client_details(daemon: Daemon, relay: CaptureRelay) -> None:
    ip, agent = "203.0.113.77", "UA-Marker/9.9 (Quokkabrowser)"
    reply = call(daemon.web_port, "POST", "/ticketnest/contact", VALID, {"X-Forwarded-For": ip, "User-Agent": agent})
    assert (reply.status, reply.headers["location"]) == (303, "/ticketnest/contact/thanks")
    assert "set-cookie" not in reply.headers
    thanks = call(daemon.web_port, "GET", reply.headers["location"], headers={"User-Agent": agent})
    assert thanks.status == 200 and "Thank you" in thanks.text
    wait_for(lambda: relay.to(STAFF) and relay.to(STAFF2) and relay.to(CUSTOMER), what="forwards and ack")
    forward = relay.to(STAFF)[0]
    assert forward.rcpt_tos == [STAFF] and forward.mail_from == CARE  # and a copy of its own to STAFF2
    assert str(forward.message["From"]) == f"Zoë Müller via TicketNest <{CARE}>"
    assert str(forward.message["Reply-To"]).startswith("care+")
    assert str(forward.message["Subject"]).endswith("] TicketNest: Where are my tickets? Order 4711, …")  # brand, words
    body = forward.message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    for line in ("Name:      Zoë Müller", f"E-Mail:    {CUSTOMER}", "Company:   Ätna Events GmbH",
                 "Address:   Hauptstraße 1, 10115 Berlin", "Telephone: +49 30 123456", "Fax:       +49 30 123457",
                 "Wishes to be contacted by: telephone", "Where are my tickets?\nOrder 4711, please help."):
        assert line in body, line
    ack = relay.to(CUSTOMER)[0]
    assert ack.rcpt_tos == [CUSTOMER] and ack.message["Auto-Submitted"] == "auto-replied"
    assert len(relay.received) == 3
    needles = [ip.encode(), agent.encode(), b"Quokkabrowser"]
    assert [c for c in relay.received if any(n in c.raw for n in needles)] == []
    wait_for(lambda: daemon.status()["outbound_queued"] == 0, what="queue drained")
    assert daemon.status()["open_cases"] == 1
    assert files_containing(daemon.data_dir, needles) == []
    assert not [n for n in needles if n in daemon.log.read_bytes()]


def test_header_like_input_adds_no_header_or_recipient(daemon: Daemon, relay: CaptureRelay) -> None:
    fields = {**VALID, "name": 'Eve "Boss" <eve@evil.example>, victim@evil.example; Bcc: victim@evil.example',
              "company": "To: victim@evil.example", "query": "Bcc: victim@evil.example\r\n\r\nCc: victim@evil.example"}
    assert post(daemon, fields).status == 303
    wait_for(lambda: relay.to(STAFF) and relay.to(STAFF2) and relay.to(CUSTOMER), what="forwards and ack")
    assert sorted(r for c in relay.received for r in c.rcpt_tos) == sorted([STAFF, STAFF2, CUSTOMER])
    for captured in relay.received:
        headers = captured.raw.split(b"\r\n\r\n", 1)[0].decode()
        assert "victim" not in "".join(v for k, v in captured.message.items() if k.lower() in ("to", "cc", "bcc"))
        assert not re.search(r"^(Bcc|Cc):", headers, re.M)
    forward = relay.to(STAFF)[0].message
    assert forward["From"].addresses[0].addr_spec == CARE
    assert forward["From"].addresses[0].display_name.startswith('Eve "Boss" <eve@evil.example>')


# ----- refused submissions: per field, nothing stored or sent -----


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "", "Please fill in this field."),
    ("email", "", "Please fill in this field."),
    ("query", "  \n ", "Please fill in this field."),
    ("name", "x" * 201, "This is too long."),
    ("company", "x" * 201, "This is too long."),
    ("query", "x" * 10_001, "This is too long."),
    ("address", "a\nb\nc\nd\ne\nf\ng", "Please use fewer lines."),
    ("query", "text with a \x00 NUL", "control characters"),
    ("email", "not-an-address", "valid e-mail address"),
    ("email", "alice@example.org, bob@evil.example", "valid e-mail address"),
    ("email", "alice@example.org)<bob@evil.example>", "valid e-mail address"),
    ("email", "noreply@customer.example", "does not take replies"),
    ("telephone", "call me maybe", "digits, spaces"),
    ("fax", "+49 (30) 1234-5/6.7x", "digits, spaces"),
])
def test_wrong_field_is_reshown_with_its_message(shared: Daemon, field: str, value: str, message: str) -> None:
    reply = post(shared, {**VALID, field: value})
    assert reply.status == 400
    assert message in reply.field_error(field)
    assert [n for n in ("name", "email", "query", "company", "address", "telephone", "fax")
            if n != field and reply.field_error(n)] == []
    assert f'<a href="#{field}">' in reply.text  # the summary links to the field
    assert f'value="{html.escape(VALID["company"])}"' in reply.text or field == "company"
    assert committed(shared) == 0
    assert f"form_refused site=ticketnest reason=invalid fields={field}" in shared.log.read_text()


def test_our_own_address_is_refused(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = start(tmp_path, relay, "ixs.test", "ixs.example")  # .test addresses are refused anyway
    try:
        reply = post(daemon, {**VALID, "email": "Care@ixs.example"})
        assert reply.status == 400 and "not ours" in reply.field_error("email")
        assert committed(daemon) == 0
    finally:
        daemon.stop()


def test_every_error_at_once_keeps_the_values(shared: Daemon) -> None:
    reply = post(shared, {"name": "", "email": "x@", "query": "", "company": 'ACME <b>"Events"</b>',
                          "telephone": "", "preferred_contact": "telephone"})
    assert reply.status == 400
    assert {n: bool(reply.field_error(n)) for n in ("name", "email", "query", "telephone", "company")} == {
        "name": True, "email": True, "query": True, "telephone": True, "company": False}
    assert "Required when you ask us to call you" in reply.field_error("telephone")
    assert 'value="ACME &lt;b&gt;&#34;Events&#34;&lt;/b&gt;"' in reply.text
    assert 'value="telephone" checked' in reply.text
    assert "Please check 4 fields" in reply.text
    assert committed(shared) == 0


def test_preferred_contact_must_be_email_or_telephone(shared: Daemon) -> None:
    reply = post(shared, {**VALID, "preferred_contact": "fax"})
    assert reply.status == 400 and "Please choose e-mail or telephone." in reply.text
    assert committed(shared) == 0


@pytest.mark.parametrize("field", ["name", "email", "company", "telephone", "fax"])
@pytest.mark.parametrize("payload", ["\r\nBcc: victim@evil.example", "\nBcc: victim@evil.example", "\r",
                                     "\x00", "\u2028Bcc: victim@evil.example", "\x85", "\t"])
def test_control_characters_in_one_line_fields_are_refused(shared: Daemon, field: str, payload: str) -> None:
    reply = post(shared, {**VALID, field: VALID[field][:5] + payload + VALID[field][5:]})
    assert reply.status == 400
    assert reply.field_error(field)
    assert committed(shared) == 0


def test_honeypot_pretends_success_and_sends_nothing(daemon: Daemon, relay: CaptureRelay) -> None:
    reply = post(daemon, {**VALID, "website": "http://spam.example"})
    assert (reply.status, reply.headers["location"]) == (303, "/ticketnest/contact/thanks")
    assert "form_refused site=ticketnest reason=honeypot" in daemon.log.read_text()
    assert post(daemon, {**VALID, "email": "bob@customer.example"}).status == 303
    # forward and ack go out over separate relay connections: either may arrive first
    wait_for(lambda: relay.to("bob@customer.example") and relay.to(STAFF), what="forward and ack of the real one")
    assert len(relay.to(STAFF)) == 1 and relay.to(CUSTOMER) == [] and committed(daemon) == 1


def test_oversized_or_unbounded_bodies_are_refused(shared: Daemon) -> None:
    big = urlencode({**VALID, "query": "x" * 300_000}).encode()
    reply = call(shared.web_port, "POST", "/ticketnest/contact", body=big,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 413
    conn = http.client.HTTPConnection("127.0.0.1", shared.web_port, timeout=30)
    try:
        conn.request("POST", "/ticketnest/contact", body=iter([urlencode(VALID).encode()]), encode_chunked=True,
                     headers={"Content-Type": "application/x-www-form-urlencoded", "Transfer-Encoding": "chunked"})
        assert conn.getresponse().status == 411
    finally:
        conn.close()
    assert committed(shared) == 0


# ----- per-IP limit, unavailable store -----


def test_posts_per_ip_are_limited(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = start(tmp_path, relay, 'verification = "off"', 'verification = "off"\nmax_posts_per_ip_per_hour = 3')
    try:
        for _ in range(3):
            assert post(daemon, {**VALID, "name": ""}, client="").status == 400
        limited = post(daemon, VALID, client="")
        assert limited.status == 429
        assert 3000 < int(limited.headers["retry-after"]) <= 3600
        assert "Please try again later" in limited.text and 'value="Ätna Events GmbH"' in limited.text
        assert "form_refused site=ticketnest reason=rate_limited" in daemon.log.read_text()
        assert committed(daemon) == 0
        assert post(daemon, VALID, client="198.51.100.9").status == 303  # another client has its own budget
        assert post(daemon, VALID, client="198.51.100.9").status == 303
        assert post(daemon, VALID, site="ixs", client="").status == 429  # the limit is per client, not per site
        assert b"198.51.100.9" not in daemon.log.read_bytes()
    finally:
        daemon.stop()


def test_store_unavailable_keeps_the_text_and_stores_nothing(tmp_path: Path, relay: CaptureRelay) -> None:
    daemon = start(tmp_path, relay, "min_free_bytes = 1\n", f"min_free_bytes = {10**18}\n")
    try:
        reply = post(daemon, VALID)
        assert reply.status == 503
        assert "We could not receive your message just now" in reply.text and "Where are my tickets?" in reply.text
        assert "form_refused site=ticketnest reason=disk_low" in daemon.log.read_text()
        assert committed(daemon) == 0
    finally:
        daemon.stop()


# ----- the verification code -----


def test_code_image_audio_and_single_use(coded: Daemon, relay: CaptureRelay) -> None:
    page = call(coded.web_port, "GET", "/ticketnest/contact")
    token = page.token()
    assert f'src="/ticketnest/contact/code.png?t={token}"' in page.text
    assert f'src="/ticketnest/contact/code.wav?t={token}"' in page.text
    assert '<label for="verification_code">' in page.text
    code = tokens(coded).reveal("ticketnest", token)
    assert code and code.isdigit() and len(code) == 6
    blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert code not in token and code.encode() not in blob  # the client cannot read it
    image = call(coded.web_port, "GET", f"/ticketnest/contact/code.png?t={token}")
    assert image.status == 200 and image.headers["content-type"] == "image/png"
    audio = call(coded.web_port, "GET", f"/ticketnest/contact/code.wav?t={token}")
    assert audio.status == 200 and audio.headers["content-type"] == "audio/wav"
    assert call(coded.web_port, "GET", f"/ixs/contact/code.png?t={token}").status == 404  # bound to its site
    fields = {**VALID, "verification_code": code, "code_token": token}
    assert post(coded, fields).status == 303
    wait_for(lambda: relay.to(STAFF), what="forward")
    assert call(coded.web_port, "GET", f"/ticketnest/contact/code.png?t={token}").status == 404
    replay = post(coded, fields)
    assert replay.status == 400 and "already used" in replay.field_error("verification_code")
    coded.stop()
    serving(coded.start())  # the used-token memory is gone; the store still knows the token
    again = post(coded, fields)
    assert again.status == 400 and "already used" in again.field_error("verification_code")
    assert committed(coded) == 1 and len(relay.to(STAFF)) == 1


def test_wrong_code_uses_up_the_token(coded: Daemon, relay: CaptureRelay) -> None:
    token = call(coded.web_port, "GET", "/ticketnest/contact").token()
    code = tokens(coded).reveal("ticketnest", token)
    assert code is not None
    wrong = post(coded, {**VALID, "verification_code": f"{(int(code) + 1) % 10**6:06d}", "code_token": token})
    assert wrong.status == 400 and "not the number shown" in wrong.field_error("verification_code")
    assert 'value="Zoë Müller"' in wrong.text
    assert 'id="verification_code" name="verification_code" value=""' in wrong.text
    assert wrong.token() != token
    retry = post(coded, {**VALID, "verification_code": code, "code_token": token})
    assert "already used" in retry.field_error("verification_code")
    fresh = retry.token()
    assert post(coded, {**VALID, "verification_code": f" {tokens(coded).reveal('ticketnest', fresh)} ",
                        "code_token": fresh}).status == 303
    assert committed(coded) == 1


def test_expired_foreign_forged_or_missing_codes_are_refused(coded: Daemon) -> None:
    old, old_code = tokens(coded, clock=time.time() - 1000).issue("ticketnest")  # expired 100 s ago
    foreign, foreign_code = tokens(coded).issue("ixs")
    forged = call(coded.web_port, "GET", "/ticketnest/contact").token()
    forged = forged[:30] + ("A" if forged[30] != "A" else "B") + forged[31:]
    unknown_key, unknown_code = CodeTokens(b"k" * 32, 900, time.time).issue("ticketnest")
    cases = [(old, old_code, "has expired"), (foreign, foreign_code, "Please type the number shown below"),
             (forged, "123456", "Please type the number shown below"),
             (unknown_key, unknown_code, "Please type the number shown below"), ("", "123456", "number shown below")]
    for token, code, message in cases:
        reply = post(coded, {**VALID, "verification_code": code, "code_token": token})
        assert reply.status == 400 and message in reply.field_error("verification_code"), (token, reply.text[-3000:])
    fresh = call(coded.web_port, "GET", "/ticketnest/contact").token()
    missing = post(coded, {**VALID, "code_token": fresh})
    assert "Please type the number from the image" in missing.field_error("verification_code")
    assert call(coded.web_port, "GET", f"/ticketnest/contact/code.png?t={old}").status == 404
    assert committed(coded) == 0
