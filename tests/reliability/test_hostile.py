"""Hostile and malformed mail: parse() stays bounded and never raises; the daemon answers 250 or a
clean 5xx, opens a case or quietly discards, and keeps serving (NOOP, next case) after each one."""

from __future__ import annotations

import base64
import concurrent.futures
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email import policy
from pathlib import Path

import pytest

from careservice.mail import Parsed
from careservice.mail import parse
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import set_keys
from tests.reliability.helpers import shared_daemon
from tests.reliability.helpers import status
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

HANG = 10.0  # seconds: a hang detector, not a performance bound (timings are printed for the report)
CUSTOMER = "hostile.sender@customer.example"
FORWARD_HEADERS = {"content-type", "mime-version", "content-transfer-encoding", "from", "to", "reply-to",
                   "subject", "date", "message-id", "x-careservice-loop"}


@dataclass(frozen=True)
class Hostile:
    name: str
    raw: bytes
    expect: str  # "case": forwarded and acknowledged; "discard": neither; "refuse": a 5xx at DATA
    mail_from: str = CUSTOMER


def head(marker: str, extra: bytes = b"", sender: bytes = CUSTOMER.encode()) -> bytes:
    return (b"From: Hostile Tester <" + sender + b">\r\nTo: " + CARE.encode() + b"\r\nSubject: " + marker.encode()
            + b"\r\nMessage-ID: <" + marker.encode() + b"@customer.example>\r\n" + extra)


def folded(name: bytes, value: bytes, width: int = 900) -> bytes:
    """A header folded into SMTP-legal lines however long its value is."""
    return name + b": " + b"\r\n ".join(value[i:i + width] for i in range(0, len(value), width)) + b"\r\n"


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def nested_mime(depth: int, marker: str) -> bytes:
    out = head(marker)
    for i in range(depth):
        out += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
    out += b"Content-Type: text/plain\r\n\r\n" + marker.encode() + b" deep\r\n"
    return out + b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))


def multipart(marker: str, *parts: bytes, ctype: bytes = b"multipart/mixed") -> bytes:
    body = b"".join(b"--XX\r\n" + p + b"\r\n" for p in parts) + b"--XX--\r\n"
    return head(marker, b"Content-Type: " + ctype + b'; boundary="XX"\r\n') + b"\r\n" + body


def text_part(marker: str) -> bytes:
    return b"Content-Type: text/plain\r\n\r\n" + marker.encode() + b" body text"


def catalogue() -> list[Hostile]:
    m = "hostile-{}-mark"
    tnef = b64(b"\x78\x9f\x3e\x22" + bytes(range(256)) * 12)
    report = (b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
              b"Final-Recipient: rfc822; gone@example.net\r\nAction: failed\r\nStatus: 5.1.1")
    semis = b";" * 120_000
    return [
        Hostile("huge_header_block", b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 880) for i in range(150))
                + head(m.format("huge_header_block")) + b"\r\nbody hostile-huge_header_block-mark\r\n", "case"),
        Hostile("from_80k", folded(b"From", b"\\a" * 40_000 + b" <" + CUSTOMER.encode() + b">")
                + head(m.format("from_80k"))[head(m.format("from_80k")).index(b"To:"):] + b"\r\nbody\r\n", "case"),
        Hostile("nested_comments_from", folded(b"From", b"(" * 3000 + CUSTOMER.encode())
                + b"Subject: hostile-nested_comments_from-mark\r\n\r\nbody\r\n", "case"),
        Hostile("nested_comments_content_type", head(m.format("nested_comments_content_type"),
                                                     folded(b"Content-Type", b"text/plain " + b"(" * 3000))
                + b"\r\nbody\r\n", "case"),
        Hostile("nested_comments_in_part", multipart(m.format("nested_comments_in_part"), text_part("x"),
                                                     folded(b"Content-Type", b"text/plain " + b"(" * 2000)
                                                     + b"\r\nhidden"), "case"),
        Hostile("mime_1000_deep", nested_mime(1000, m.format("mime_1000_deep")), "case"),
        Hostile("mime_4000_parts", multipart(m.format("mime_4000_parts"), *[text_part("p")] * 4000), "case"),
        Hostile("part_header_quadratic", multipart(m.format("part_header_quadratic"), text_part("x"),
                                                   folded(b"Content-Type", b'text/plain; a="' + semis + b'"')
                                                   + b"\r\nslow"), "case"),
        Hostile("unknown_charset", head(m.format("unknown_charset"), b"Content-Type: text/plain; charset=x-nope-42\r\n")
                + b"\r\nbody \xff\xfe\r\n", "case"),
        Hostile("mislabelled_charset", head(m.format("mislabelled_charset"),
                                            b"Content-Type: text/plain; charset=us-ascii\r\n")
                + b"\r\nJ\xc3\xb6rg \xe9\xff\r\n", "case"),
        Hostile("utf16_label_on_ascii", head(m.format("utf16_label_on_ascii"),
                                             b"Content-Type: text/plain; charset=utf-16\r\n") + b"\r\nabc\r\n", "case"),
        Hostile("broken_base64", head(m.format("broken_base64"), b"Content-Transfer-Encoding: base64\r\n")
                + b"\r\n!!!a=b=c\r\n====\r\nQUJD\r\n", "case"),
        Hostile("broken_quoted_printable", head(m.format("broken_quoted_printable"),
                                                b"Content-Transfer-Encoding: quoted-printable\r\n")
                + b"\r\nab=ZZcd=\r\n=\r\n=4\r\n", "case"),
        Hostile("nul_bytes", head(m.format("nul_bytes"), b"X-Nul: a\x00b\r\n").replace(b"Hostile", b"Hos\x00tile")
                + b"\r\nbo\x00dy\x00\r\n\x00\r\n", "case"),
        Hostile("eight_bit_headers", head(m.format("eight_bit_headers"), b"X-Eight: \xff\xfe\xc3\xa9\r\n")
                .replace(b"Hostile Tester", b"J\xc3\xb6rg \xff") + b"\r\nbody\r\n", "case"),
        Hostile("rfc2047_crlf", b"From: =?utf-8?q?Evil=0D=0ABcc=3A_victim@evil.example?= <" + CUSTOMER.encode()
                + b">\r\nTo: " + CARE.encode() + b"\r\nSubject: =?utf-8?b?"
                + base64.b64encode(b"hostile-rfc2047_crlf-mark\r\nBcc: victim@evil.example\r\n\r\nbody")
                + b"?=\r\n\r\nbody\r\n", "case"),
        Hostile("duplicate_from", head(m.format("duplicate_from"), b"From: Other <other@customer.example>\r\n")
                + b"\r\nbody\r\n", "case"),
        Hostile("no_from", head(m.format("no_from"))[head(m.format("no_from")).index(b"To:"):] + b"\r\nbody\r\n",
                "case"),
        Hostile("empty_body", head(m.format("empty_body")) + b"\r\n", "case"),
        Hostile("empty_message", b"", "case"),
        Hostile("missing_boundary", head(m.format("missing_boundary"), b"Content-Type: multipart/mixed\r\n")
                + b"\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n", "case"),
        Hostile("unterminated_boundary", head(m.format("unterminated_boundary"),
                                              b'Content-Type: multipart/mixed; boundary="x"\r\n')
                + b"\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n", "case"),
        Hostile("tnef_winmail_dat", multipart(m.format("tnef_winmail_dat"), text_part("tnef"),
                                              b"Content-Type: application/ms-tnef; name=winmail.dat\r\n"
                                              b"Content-Disposition: attachment; filename=winmail.dat\r\n"
                                              b"Content-Transfer-Encoding: base64\r\n\r\n" + tnef), "case"),
        Hostile("html_tag_bomb", head(m.format("html_tag_bomb"), b"Content-Type: text/html\r\n") + b"\r\n"
                + (b"<" * 900 + b"\r\n") * 150, "case"),
        Hostile("binary_garbage", head(m.format("binary_garbage")) + b"\r\n"
                + b"\r\n".join(bytes((i * 37 + j) % 256 for j in range(700)).replace(b"\r", b"").replace(b"\n", b"")
                               for i in range(50)) + b"\r\n", "case"),
        Hostile("line_over_1000", head(m.format("line_over_1000")) + b"\r\n" + b"x" * 5000 + b"\r\n", "refuse"),
        Hostile("dsn_from_mailer_daemon", multipart(m.format("dsn"), text_part("failed"), report,
                                                    ctype=b"multipart/report; report-type=delivery-status")
                .replace(b"From: Hostile Tester <" + CUSTOMER.encode() + b">", b"From: MAILER-DAEMON@mx.example"),
                "discard", mail_from=""),
        Hostile("out_of_office_auto_submitted", head(m.format("ooo1"), b"Auto-Submitted: auto-replied\r\n")
                + b"\r\nI am away\r\n", "discard"),
        Hostile("out_of_office_x_autoreply", head(m.format("ooo2"), b"X-Autoreply: yes\r\n")
                + b"\r\nI am away\r\n", "discard"),
        Hostile("out_of_office_precedence", head(m.format("ooo3"), b"Precedence: auto_reply\r\n")
                + b"\r\nI am away\r\n", "discard"),
    ]


CATALOGUE = catalogue()


def bounded_parse(raw: bytes, mail_from: str = CUSTOMER) -> tuple[Parsed, float]:
    """parse() in a thread; fail (instead of hanging the suite) when it runs past HANG seconds."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    start = time.monotonic()
    try:
        parsed = pool.submit(parse, raw, mail_from).result(timeout=HANG)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"parse() still running after {HANG} s") from None
    finally:
        pool.shutdown(wait=False)
    return parsed, time.monotonic() - start


@pytest.mark.parametrize("item", CATALOGUE, ids=[h.name for h in CATALOGUE])
def test_parse_never_raises_and_stays_bounded(item: Hostile) -> None:
    parsed, took = bounded_parse(item.raw, item.mail_from)
    print(f"parse {item.name}: {took:.3f} s defects={parsed.defects}")
    assert len(parsed.subject) <= 500 and "\n" not in parsed.subject and "\r" not in parsed.subject
    assert (parsed.automatic != "") == (item.expect == "discard")


def test_80k_from_is_dropped_but_the_other_headers_survive() -> None:
    raw = b"From: " + b"\\a" * 40_000 + b" <a@customer.example>\r\n" + head("keep-subject")[head("").index(b"To:"):]
    parsed, took = bounded_parse(raw + b"\r\nbody\r\n")
    print(f"parse unfolded 80 KB From: {took:.3f} s")
    assert parsed.from_address == "" and "long_header_dropped" in parsed.defects
    assert parsed.subject == "keep-subject" and parsed.message_id == "keep-subject@customer.example"


def test_bare_cr_line_ends_are_read_like_the_stdlib_does() -> None:
    raw = (head("cr-subject") + b"\r\nfirst line\r\n" + b"more text\r\n" * 500).replace(b"\r\n", b"\r")
    parsed, _ = bounded_parse(raw)
    assert parsed.subject == "cr-subject" and parsed.from_address == CUSTOMER
    assert "first line" in parsed.text


@pytest.mark.parametrize("name", ["parts_100k", "html_10mb", "part_header_256k", "mime_5000_deep"])
def test_big_inputs_parse_without_stalling(name: str) -> None:
    """Inputs larger than the test daemon's SMTP limit (IMAP and the 10 MB default accept them)."""
    raw = {
        "parts_100k": lambda: multipart("parts", *[b"Content-Type: text/plain\r\n\r\np"] * 100_000),
        "html_10mb": lambda: head("html", b"Content-Type: text/html\r\n") + b"\r\n" + b"<" * 10_000_000,
        "part_header_256k": lambda: multipart("semis", text_part("x"), folded(
            b"Content-Type", b'text/plain; a="' + b";" * 256_000 + b'"') + b"\r\nslow"),
        "mime_5000_deep": lambda: nested_mime(5000, "deep"),
    }[name]()
    parsed, took = bounded_parse(raw)
    print(f"parse {name} ({len(raw)} bytes): {took:.3f} s defects={parsed.defects}")
    assert parsed.subject


# ----- the same catalogue through the running daemon -----


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, CaptureRelay]]:
    yield from shared_daemon(tmp_path_factory, "hostile")


def smtp_send(port: int, mail_from: str, raw: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA; the DATA reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        assert client.mail(mail_from)[0] == 250
        assert client.rcpt(CARE)[0] == 250
        code, text = client.data(raw)
        assert client.noop()[0] == 250, "the session survives the message"
    return code, text


@pytest.mark.parametrize("item", CATALOGUE, ids=[h.name for h in CATALOGUE])
def test_daemon_answers_cleanly_and_keeps_serving(shared: tuple[Daemon, CaptureRelay], item: Hostile) -> None:
    daemon, relay = shared
    log_start = daemon.log.stat().st_size
    forwards, acks = len(relay.to(STAFF)), len(relay.to(CUSTOMER))
    start = time.monotonic()
    code, text = smtp_send(daemon.smtp_port, item.mail_from, item.raw)
    assert b"Traceback" not in text and b"File " not in text
    if item.expect == "refuse":
        assert 500 <= code < 600, (code, text)
        return
    assert code == 250, (code, text)
    wait_for(lambda: status(daemon)["inbound_pending"] == 0, timeout=HANG, what=f"{item.name} processed")
    if item.expect == "case":
        wait_for(lambda: len(relay.to(STAFF)) == forwards + 1, timeout=HANG, what="forward")
    wait_for(lambda: status(daemon)["outbound_queued"] == 0, timeout=HANG, what="queue drained")
    print(f"daemon {item.name}: 250 -> {item.expect} in {time.monotonic() - start:.3f} s")
    assert len(relay.to(STAFF)) == forwards + (item.expect == "case")
    assert len(relay.to(CUSTOMER)) - acks <= (item.expect == "case")  # acks to one address are rate-limited

    def new_log() -> str:
        return daemon.log.read_bytes()[log_start:].decode(errors="replace")

    # the worker writes its log line just after the commit that status already shows
    wait_for(lambda: "case_advanced" in new_log(), timeout=HANG, what="the worker's log line")
    log = new_log()
    assert "Traceback" not in log and "case_stage_failed" not in log, log[-3000:]
    if item.expect == "case":
        forward = relay.to(STAFF)[-1]
        names = {k.lower() for k in forward.message.keys()}
        assert names <= FORWARD_HEADERS, names - FORWARD_HEADERS  # nothing injected from the customer's headers
    else:
        assert "discard_" in log


def test_no_personal_data_in_the_log_after_the_catalogue(shared: tuple[Daemon, CaptureRelay]) -> None:
    daemon, _ = shared
    markers = ["hostile-", "Hostile Tester", CUSTOMER, "victim@evil", "winmail", "I am away"]
    assert log_leaks(daemon, markers) == []
    counts = status(daemon)
    assert counts["inbound_pending"] == 0 and counts["outbound_queued"] == 0


def test_ten_megabyte_attachment(tmp_path: Path, relay: CaptureRelay) -> None:
    config = set_keys(write_config(tmp_path, relay.port), "smtp", max_message_bytes=16_000_000)
    daemon = Daemon(config).start()
    try:
        data = bytes(range(256)) * 40_000  # 10.24 MB
        raw = multipart("hostile-10mb-mark", text_part("hostile-10mb-mark"),
                        b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; "
                        b"filename=big.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64(data))
        start = time.monotonic()
        code, _ = smtp_send(daemon.smtp_port, CUSTOMER, raw)
        accepted = time.monotonic() - start
        assert code == 250
        wait_for(lambda: relay.to(STAFF), timeout=60, what="forward with 10 MB attachment")
        print(f"10 MB attachment: 250 after {accepted:.2f} s, forwarded after {time.monotonic() - start:.2f} s")
        forward = message_from_bytes(relay.to(STAFF)[0].raw, policy=policy.default)
        attached = [p for p in forward.iter_attachments() if p.get_filename() == "big.bin"]
        assert attached and attached[0].get_content() == data
        wait_for(lambda: status(daemon)["outbound_queued"] == 0, timeout=60, what="queue drained")
    finally:
        daemon.stop()


def mail_reply(daemon: Daemon) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
        client.ehlo()
        return client.mail(CUSTOMER)


def test_an_internal_error_is_a_plain_451_without_details(tmp_path: Path, relay: CaptureRelay) -> None:
    """aiosmtpd would answer "500 Error: (FileNotFoundError) [Errno 2] ... /path"; the client gets 451."""
    daemon = Daemon(write_config(tmp_path, relay.port)).start()
    moved = tmp_path / "moved"
    try:
        daemon.data_dir.rename(moved)  # the free-space check at MAIL now fails
        wait_for(lambda: mail_reply(daemon)[0] != 250, timeout=5, what="MAIL fails")  # the check is cached 0.25 s
        assert mail_reply(daemon) == (451, b"4.3.0 Temporary failure, please try again later")
        moved.rename(daemon.data_dir)
        wait_for(lambda: mail_reply(daemon)[0] == 250, timeout=5, what="MAIL taken again")
        assert "session_failed error=FileNotFoundError" in daemon.log.read_text()
        assert str(tmp_path) not in daemon.log.read_text().split("session_failed")[1].splitlines()[0]
    finally:
        if moved.exists():
            moved.rename(daemon.data_dir)
        daemon.stop()
