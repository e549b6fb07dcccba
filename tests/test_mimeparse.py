"""careservice.mimeparse.parse_message builds what the stdlib's parser builds from the whole message."""

from __future__ import annotations

from email.feedparser import FeedParser
from email.message import Message

import pytest

from careservice.mimeparse import _PARSING
from careservice.mimeparse import FEED_CHUNK
from careservice.mimeparse import parse_message
from careservice.mimeparse import trim_headers

HEAD = b"From: Alice <alice@customer.example>\r\nSubject: tickets\r\n"
CASES = {
    "plain": HEAD + b"\r\nhello\r\nsecond line\r\n",
    "lf only": HEAD.replace(b"\r\n", b"\n") + b"\nhello\nsecond\n",
    "cr only": HEAD.replace(b"\r\n", b"\r") + b"\rhello\rsecond\r",
    "cr then crlf": b"From: a@customer.example\r\r\nhello\r\n",
    "empty body": HEAD + b"\r\n",
    "no blank line": HEAD.rstrip(b"\r\n"),
    "blank lines open the body": HEAD + b"\r\n\r\n\r\nhello\r\n",
    "a line that is no header": b"From: a@customer.example\r\nnot a header\r\nTo: b@care.example\r\n\r\nbody\r\n",
    "continuation first": b" folded\r\nFrom: a@customer.example\r\n\r\nbody\r\n",
    "unix from": b"From alice@customer.example Mon Jan  1 00:00:00 2024\r\n" + HEAD + b"\r\nbody\r\n",
    "8bit and bad bytes": HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe \xff\xfe\r\n",
    "base64 text": HEAD + b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n",
    "larger than a feed chunk": HEAD + b"\r\n" + b"x" * 70 + b"\r\n" * (2 * FEED_CHUNK // 72),
    "content type without a subtype": HEAD + b"Content-Type: text\r\n\r\nbody\r\n",
    "multipart": HEAD + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\npreamble\r\n--XX\r\n"
                 b"Content-Type: text/plain\r\n\r\nhello\r\n--XX\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n"
                 b"--XX--\r\nepilogue\r\n",
    "multipart, cr only": (HEAD + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n\r\nhello\r\n"
                           b"--XX--\r\n").replace(b"\r\n", b"\r"),
    "multipart without a boundary": HEAD + b"Content-Type: multipart/mixed\r\n\r\nbody\r\n",
    "message/rfc822": HEAD + b"Content-Type: message/rfc822\r\n\r\nFrom: b@customer.example\r\n\r\ninner\r\n",
    "delivery status": HEAD + b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
                       b"Final-Recipient: rfc822; a@b\r\n",
}


def _whole(raw: bytes) -> Message:
    """The stdlib's parse of the trimmed message, every byte fed."""
    head, body, _ = trim_headers(raw)
    parser = FeedParser(policy=_PARSING)
    parser.feed(str(head + bytes(body), "ascii", "surrogateescape"))
    return parser.close()


def _shape(msg: Message) -> tuple[object, ...]:
    payload = msg.get_payload()
    return (msg.get_unixfrom(), msg.items(), [type(d).__name__ for d in msg.defects], msg.preamble, msg.epilogue,
            [_shape(part) for part in payload] if isinstance(payload, list) else payload)


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
def test_parse_message_is_the_stdlib_parse(raw: bytes) -> None:
    head, body, _ = trim_headers(raw)
    assert _shape(parse_message(head, body)) == _shape(_whole(raw))


@pytest.fixture
def fed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every piece of text fed to a FeedParser."""
    pieces: list[str] = []
    original = FeedParser.feed
    monkeypatch.setattr(FeedParser, "feed", lambda self, data: (pieces.append(data), original(self, data))[1])
    return pieces


def test_a_plain_body_is_not_fed_to_the_parser(fed: list[str]) -> None:
    head, body, _ = trim_headers(CASES["plain"])
    assert parse_message(head, body).get_payload() == "hello\r\nsecond line\r\n"
    assert "hello" not in "".join(fed)


def test_a_multipart_message_is_fed_once(fed: list[str]) -> None:
    head, body, _ = trim_headers(CASES["multipart"])
    assert parse_message(head, body).is_multipart()
    assert "".join(fed) == str(head + bytes(body), "ascii")
