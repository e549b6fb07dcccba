"""The contact form in a real browser: Debian's chromium through Playwright, against the real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import CHROMIUM_MARKS
from tests.browser import chromium_page
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import wait_for
from tests.webclient import serving
from tests.webclient import start
from tests.webclient import tokens

SCREENSHOT = Path("/tmp/form.png")

pytestmark = CHROMIUM_MARKS


@pytest.fixture
def coded(tmp_path: Path, relay: CaptureRelay) -> Iterator[Daemon]:
    daemon = start(tmp_path, relay, 'verification = "off"', 'verification = "image"')
    try:
        yield serving(daemon)
    finally:
        daemon.stop()


def test_customer_fills_in_the_form_in_chromium(coded: Daemon, relay: CaptureRelay) -> None:
    base = f"http://127.0.0.1:{coded.web_port}/ticketnest/contact"
    with chromium_page(900, 1500) as (page, blocked):
        page.goto(base)
        assert page.title() == "Contact customer care · TicketNest"
        image = page.locator(".code img")
        image.wait_for()
        page.wait_for_function("document.querySelector('.code img').naturalWidth > 0")
        assert image.evaluate("img => img.naturalWidth") == 240
        assert page.locator("header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(29, 91, 140)"
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        token = page.locator("input[name=code_token]").input_value()
        code = tokens(coded).reveal("ticketnest", token)
        assert code is not None
        page.get_by_label("Name (required)", exact=True).fill("Zoë Müller")
        page.get_by_label("E-Mail (required)", exact=True).fill("zoe@customer.example")
        page.get_by_label("Company (optional)", exact=True).fill("Ätna Events GmbH")
        page.get_by_label("Address (optional)", exact=True).fill("Hauptstraße 1\n10115 Berlin")
        page.get_by_role("textbox", name="Telephone (optional)", exact=True).fill("+49 30 123456")
        page.get_by_label("By telephone", exact=True).check()
        # a call chosen, the field's accessible name (what a screen reader says) is "required"
        phone = page.get_by_role("textbox", name="Telephone (required)", exact=True)
        assert phone.input_value() == "+49 30 123456" and phone.evaluate("e => e.labels[0].innerText") == (
            "Telephone (required)")
        page.get_by_label("By e-mail", exact=True).check()
        assert page.get_by_role("textbox", name="Telephone (optional)", exact=True).is_visible()
        page.get_by_label("By telephone", exact=True).check()
        page.get_by_label("Your query (required)", exact=True).fill(
            "My tickets for Saturday did not come.\nOrder 4711")
        code_field = page.get_by_label("Verification code (required)", exact=True)
        code_field.fill("000000" if code != "000000" else "111111")
        page.get_by_role("button", name="Send message").click()
        page.wait_for_url(base)
        error = page.locator("#verification_code-error")
        assert "not the number shown" in error.inner_text()
        assert page.get_by_label("Name (required)", exact=True).input_value() == "Zoë Müller"  # kept
        assert page.get_by_label("By telephone", exact=True).is_checked()

        token = page.locator("input[name=code_token]").input_value()
        code_field.fill(tokens(coded).reveal("ticketnest", token) or "")
        page.get_by_role("button", name="Send message").click()
        page.wait_for_url(base + "/thanks")
        assert page.get_by_role("heading", name="Thank you").is_visible()
        assert page.context.cookies() == []
        assert blocked == []
    wait_for(lambda: relay.to(STAFF), what="forward to staff")
    body = relay.to(STAFF)[0].message.get_body(("plain",)).get_content()
    for text in ("Zoë Müller", "Ätna Events GmbH", "Hauptstraße 1, 10115 Berlin", "+49 30 123456",
                 "Wishes to be contacted by: telephone", "My tickets for Saturday did not come."):
        assert text in body, text
