"""Debian's chromium through Playwright, as the browser tests drive it (no sandbox: tests run as root)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
CHROMIUM_MARKS = [  # a browser test's marks: a module's pytestmark, or through needs_chromium
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(scripts/test.sh installs it when run as root)"),
]


def needs_chromium(test: Callable[..., None]) -> Callable[..., None]:
    for mark in CHROMIUM_MARKS:
        test = mark(test)
    return test


@contextmanager
def chromium_page(width: int, height: int) -> Iterator[tuple[Any, list[str]]]:
    """A page, and the list of what the Content-Security-Policy refused or failed to load on it (a test
    asserts it stays empty)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            blocked: list[str] = []
            page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
            page.on("requestfailed", lambda request: blocked.append(request.url))
            yield page, blocked
        finally:
            browser.close()
