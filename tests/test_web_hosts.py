"""The brands' own contact URLs: the form by Host header at each site's contact_path, over real HTTP."""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from careservice.config import ConfigError
from careservice.config import load_config
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import capture_relay
from tests.support import wait_for
from tests.support import write_config
from tests.webclient import VALID
from tests.webclient import Reply
from tests.webclient import behind_proxy
from tests.webclient import call
from tests.webclient import serving
from tests.webclient import tokens

BRANDS: list[dict[str, Any]] = tomllib.loads(
    (Path(__file__).resolve().parent.parent / "config.toml").read_text())["sites"]
CLIENTS = itertools.count(1)


def staff_of(brand: dict[str, Any]) -> str:
    return f"staff-{brand['id']}@staff.example"


def brand_sites() -> str:
    """The repo's [[sites]] as published, each with a staff address of its own to tell the forwards apart."""
    return "".join("\n[[sites]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in brand.items() if k != "staff")
                   + f"staff = [{json.dumps(staff_of(brand))}]\n" for brand in BRANDS)


def request(daemon: Daemon, method: str, path: str, host: str, fields: dict[str, str] | None = None) -> Reply:
    """One request with this Host header, from a new client each time (so the per-IP limit stays out of the way)."""
    client = f"2001:db8:{next(CLIENTS):x}::1"
    return call(daemon.web_port, method, path, fields, {"Host": host, "X-Forwarded-For": client})


@pytest.fixture(scope="module")
def relay() -> Iterator[CaptureRelay]:
    yield from capture_relay()


@pytest.fixture(scope="module")
def brands(tmp_path_factory: pytest.TempPathFactory, relay: CaptureRelay) -> Iterator[Daemon]:
    config = behind_proxy(write_config(tmp_path_factory.mktemp("brands"), relay.port, sites=brand_sites()))
    daemon = serving(Daemon(config).start())
    try:
        yield daemon
    finally:
        daemon.stop()


def test_the_four_brands_publish_their_addresses() -> None:
    assert {b["id"]: (b["web_hosts"], b["contact_path"]) for b in BRANDS} == {
        "ticketnest": (["www.ticketnest.com", "ticketnest.com"], "/contact.php"),
        "ticketluck": (["www.ticketluck.com", "ticketluck.com"], "/contact.php"),
        "ixs": (["www.ixs.net", "ixs.net"], "/contact.aspx"),
        "ticketnest-net": (["www.ticketnest.net", "ticketnest.net"], "/contact.php"),
    }


@pytest.mark.parametrize("brand", BRANDS, ids=[b["id"] for b in BRANDS])
def test_each_brand_form_at_its_own_host_and_path(brands: Daemon, relay: CaptureRelay, brand: dict[str, Any]) -> None:
    path = brand["contact_path"]
    for host in brand["web_hosts"]:
        page = request(brands, "GET", path, host)
        assert page.status == 200 and f"Contact {brand['name']} customer care" in page.text
        assert f'action="{path}"' in page.text and f"/{brand['id']}/contact" not in page.text
    reply = request(brands, "POST", path, brand["web_hosts"][0], {**VALID, "email": f"zoe@{brand['id']}.example"})
    assert (reply.status, reply.headers["location"]) == (303, f"{path}/thanks")
    thanks = request(brands, "GET", reply.headers["location"], brand["web_hosts"][0])
    assert thanks.status == 200 and f"reached {brand['name']} customer care" in thanks.text
    assert f'<a href="{path}">Send another message</a>' in thanks.text
    wait_for(lambda: relay.to(staff_of(brand)), what=f"forward to the staff of {brand['id']}")
    forward = relay.to(staff_of(brand))[0]
    assert forward.mail_from == brand["care_address"] and forward.rcpt_tos == [staff_of(brand)]
    assert forward.message["From"].addresses[0].addr_spec == brand["care_address"]


def test_host_matches_without_case_or_port(brands: Daemon) -> None:
    page = request(brands, "GET", "/contact.php", f"WWW.TicketNest.com:{brands.web_port}")
    assert page.status == 200 and 'action="/contact.php"' in page.text


def test_a_contact_path_answers_only_its_own_hosts(brands: Daemon) -> None:
    assert request(brands, "GET", "/contact.php", "ticketnest.com").status == 200
    assert request(brands, "GET", "/contact.aspx", "www.ixs.net").status == 200
    for method, path, host in [
        ("GET", "/contact.php", "www.other.example"),
        ("POST", "/contact.php", "www.other.example"),
        ("GET", "/contact.php/thanks", "www.other.example"),
        ("GET", "/contact.php", "127.0.0.1"),
        ("GET", "/contact.php", "www.ixs.net"),  # ixs has /contact.aspx
        ("POST", "/contact.php", "ixs.net"),
        ("GET", "/contact.aspx", "www.ticketnest.com"),
        ("GET", "/contact.aspx/thanks", "www.ticketnest.com"),
        ("GET", "/contact", "www.ticketnest.com"),
        ("GET", "/contact.php", "www.ticketnest.com.evil.example"),
    ]:
        reply = request(brands, method, path, host, VALID if method == "POST" else None)
        assert reply.status == 404, (method, path, host)
        assert reply.headers["x-content-type-options"] == "nosniff"


def test_site_id_path_keeps_working_on_any_host_beside_the_host_paths(brands: Daemon) -> None:
    for host in ("www.ixs.net", "www.other.example", "127.0.0.1"):
        page = request(brands, "GET", "/ticketnest/contact", host)
        assert page.status == 200 and 'action="/ticketnest/contact"' in page.text
        assert "Contact TicketNest customer care" in page.text
    reply = request(brands, "POST", "/ticketnest-net/contact", "www.ixs.net", {**VALID, "name": ""})
    assert reply.status == 400 and 'action="/ticketnest-net/contact"' in reply.text
    host_page = request(brands, "GET", "/contact.aspx", "www.ixs.net")
    assert host_page.status == 200 and 'action="/contact.aspx"' in host_page.text


def test_code_image_and_audio_follow_the_host_path(tmp_path: Path, relay: CaptureRelay) -> None:
    config = behind_proxy(write_config(tmp_path, relay.port, sites=brand_sites()))
    config.write_text(config.read_text().replace('verification = "off"', 'verification = "image"'))
    daemon = serving(Daemon(config).start())
    try:
        page = request(daemon, "GET", "/contact.aspx", "www.ixs.net")
        token = page.token()
        assert f'src="/contact.aspx/code.png?t={token}"' in page.text
        assert f'src="/contact.aspx/code.wav?t={token}"' in page.text
        assert f'href="/contact.aspx/code.wav?t={token}"' in page.text
        image = request(daemon, "GET", f"/contact.aspx/code.png?t={token}", "www.ixs.net")
        assert image.status == 200 and image.headers["content-type"] == "image/png"
        audio = request(daemon, "GET", f"/contact.aspx/code.wav?t={token}", "ixs.net")
        assert audio.status == 200 and audio.headers["content-type"] == "audio/wav"
        assert request(daemon, "GET", f"/contact.php/code.png?t={token}", "www.ticketnest.com").status == 404
        assert request(daemon, "GET", f"/contact.aspx/code.png?t={token}", "www.other.example").status == 404
        code = tokens(daemon).reveal("ixs", token)
        assert code is not None
        reply = request(daemon, "POST", "/contact.aspx", "www.ixs.net",
                        {**VALID, "verification_code": code, "code_token": token})
        assert (reply.status, reply.headers["location"]) == (303, "/contact.aspx/thanks")
    finally:
        daemon.stop()


@pytest.mark.parametrize(("site_lines", "key", "message"), [
    ('contact_path = "contact.php"', "sites[1].contact_path", 'starts with "/"'),
    ('contact_path = "/"', "sites[1].contact_path", "expected a path"),
    ('contact_path = "/{site}/contact"', "sites[1].contact_path", "expected a path"),
    ('contact_path = "/contact.php?x=1"', "sites[1].contact_path", "expected a path"),
    ('contact_path = "/contact/"', "sites[1].contact_path", "expected a path"),
    ('web_hosts = ["ixs.test", "https://www.ixs.test"]', "sites[1].web_hosts[1]", "no scheme"),
    ('web_hosts = ["www.ixs.test:443"]', "sites[1].web_hosts[0]", "no port"),
    ('web_hosts = ["www.ixs.test/contact"]', "sites[1].web_hosts[0]", "host name"),
    ('web_hosts = [""]', "sites[1].web_hosts[0]", "host name"),
    ("web_hosts = [443]", "sites[1].web_hosts[0]", "host name"),
    ('web_hosts = "www.ixs.test"', "sites[1].web_hosts", "expected a list"),
    ('web_hosts = ["ixs.test", "WWW.TicketNest.test"]', "sites[1].web_hosts[1]",
     '"www.ticketnest.test" is also sites[0].web_hosts[0]'),
    ('web_hosts = ["ixs.test", "IXS.test"]', "sites[1].web_hosts[1]", "belongs to one site only"),
])
def test_contact_address_config_errors_name_the_key(tmp_path: Path, site_lines: str, key: str, message: str) -> None:
    config = write_config(tmp_path, 1)
    text = config.read_text()
    for care, lines in (('care_address = "care@ticketnest.test"', 'web_hosts = ["www.ticketnest.test"]'),
                        ('care_address = "care@ixs.test"', site_lines)):
        assert text.count(care) == 1
        text = text.replace(care, f"{care}\n{lines}")
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert error.value.key == key and message in str(error.value)


def test_contact_address_defaults_and_host_case(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    config.write_text(config.read_text().replace(
        'care_address = "care@ixs.test"', 'care_address = "care@ixs.test"\nweb_hosts = ["WWW.IXS.test"]'))
    ticketnest, ixs = load_config(config).sites
    assert (ticketnest.web_hosts, ticketnest.contact_path) == ((), "/contact")
    assert (ixs.web_hosts, ixs.contact_path) == (("www.ixs.test",), "/contact")
