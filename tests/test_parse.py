"""careservice.mail.parse on the header and body forms real clients send (hostile ones: tests/reliability)."""

from __future__ import annotations

from email.utils import getaddresses

from careservice.mail import _PLAIN_FROM
from careservice.mail import _addresses
from careservice.mail import _decoded
from careservice.mail import one_line
from careservice.mail import parse


def test_encoded_words_in_names_subjects_and_filenames_are_decoded() -> None:
    raw = (b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <Juergen@Customer.example>\r\n"
           b"To: care@ticketnest.test, \"Second\" <second@ticketnest.test>\r\n"
           b"Subject: =?iso-8859-1?q?caf=E9?= tickets\r\nMessage-ID: <m1@customer.example>\r\n"
           b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"--XX\r\nContent-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename=\"=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--XX--\r\n")
    parsed = parse(raw, "juergen@customer.example")
    assert (parsed.from_name, parsed.from_address) == ("Jürgen Müller", "juergen@customer.example")
    assert parsed.subject == "café tickets" and parsed.message_id == "m1@customer.example"
    assert parsed.text == "hello"  # the line end before a boundary belongs to the boundary
    assert [(a.filename, a.content_type, a.data) for a in parsed.attachments] == [
        ("résumé.pdf", "application/pdf", b"%PDF")]


def test_raw_utf8_headers_and_8bit_bodies_read_as_utf8() -> None:
    raw = ("From: Jürgen <j@customer.example>\r\nSubject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln\r\n").encode()
    parsed = parse(raw, "j@customer.example")
    assert (parsed.from_name, parsed.subject, parsed.text) == ("Jürgen", "Grüße", "Grüße aus Köln\r\n")


def test_a_comment_after_the_content_type_still_reads_the_body() -> None:
    raw = b"From: a@customer.example\r\nContent-Type: text/plain (plain text); charset=iso-8859-1\r\n" \
          b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n"
    assert parse(raw, "a@customer.example").text == "café\r\n"


def test_an_encoded_word_is_never_taken_for_an_address() -> None:
    raw = b"From: =?utf-8?q?evil=0d=0abcc=3a_victim@evil.example?=\r\nSubject: x\r\n\r\nx\r\n"
    assert parse(raw, "a@customer.example").from_address == ""


def test_plain_from_headers_read_as_getaddresses_reads_them() -> None:
    names = ["", "Alice", "Alice Example", "A1 B2 C3", "9", "Alice  Example", " Alice", "O'Neil", "Müller",
             '"Example, Alice"', "=?utf-8?q?J=C3=BCrgen?=", "Alice (work)", "Alice."]
    addresses = ["a@b.c", "A.B+c-d_e@x-y.example", "a..b@c", ".a@b", "a@b..c", "a@b_c.example", '"a b"@c',
                 "a@[127.0.0.1]", "a@", "@b", "a@b.", "a b@c"]
    fast = 0
    for name in names:
        for address in addresses:
            for value in (f"{name} <{address}>", f"{name}<{address}>", address, f"<{address}>", f"{name} {address}"):
                expected = [(one_line(_decoded(n), 200), a) for n, a in getaddresses([value])]
                assert _addresses([value]) == expected, value
                fast += bool(_PLAIN_FROM.fullmatch(value))
    assert fast >= 20  # the fast path was compared, not only the stdlib's
    assert _addresses(["a@b.c", "Bob <b@c.d>"]) == [("", "a@b.c"), ("Bob", "b@c.d")]
