"""Loaded by a test daemon (PYTHONPATH): its DKIM key lookups read the TXT records of a JSON file
(name -> record, named by CARESERVICE_TEST_DKIM_TXT) instead of DNS, so the tests run offline."""

from __future__ import annotations

import json
import os

import dkim.dnsplug

_PATH = os.environ.get("CARESERVICE_TEST_DKIM_TXT", "")


def _txt(name: bytes, timeout: int = 5) -> bytes | None:
    with open(_PATH, encoding="utf-8") as file:
        record = json.load(file).get(name.decode("ascii"))
    return record.encode("ascii") if record is not None else None


if _PATH:
    dkim.dnsplug.get_txt = _txt
