"""The Dovecot fixture really stores, expunges and keeps mail across a restart."""

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from imapclient.exceptions import LoginError

from tests.dovecot import DovecotServer

pytestmark = pytest.mark.imap


def _message(n: int) -> bytes:
    return (
        f"From: customer{n}@example.com\r\nTo: care@example.com\r\n"
        f"Subject: Question {n}\r\nMessage-ID: <q{n}@example.com>\r\n\r\nBody {n}\r\n"
    ).encode()


def test_append_expunge_and_restart_keeps_mailbox(dovecot: DovecotServer) -> None:
    for n in range(3):
        dovecot.append(_message(n))
    assert dovecot.count() == 3

    with dovecot.client() as imap:
        imap.select_folder("INBOX")
        first = imap.search(["HEADER", "Message-ID", "<q0@example.com>"])
        assert len(first) == 1
        imap.delete_messages(first)
        imap.expunge()
    assert dovecot.count() == 2
    on_disk = [*dovecot.maildir.joinpath("cur").iterdir(), *dovecot.maildir.joinpath("new").iterdir()]
    assert len(on_disk) == 2

    open_session = dovecot.client()
    open_session.select_folder("INBOX")
    dovecot.stop()
    with pytest.raises((OSError, IMAPClientError)):
        open_session.noop()
    with pytest.raises(OSError):
        dovecot.count()

    dovecot.start()
    assert dovecot.count() == 2


def test_wrong_password_is_rejected(dovecot: DovecotServer) -> None:
    with IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10) as imap:
        with pytest.raises(LoginError):
            imap.login(dovecot.username, "not-the-password")
