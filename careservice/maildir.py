"""The maildir relay's one write: a message into a Maildir the way MTAs put it there."""

from __future__ import annotations

import os
import secrets


def maildir_deliver(path: os.PathLike[str], message: bytes) -> None:
    """Write one message into a Maildir: tmp/, fsync, rename into new/."""
    name = f"{secrets.token_hex(12)}.careservice"
    tmp, new = os.path.join(path, "tmp", name), os.path.join(path, "new", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, message)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, new)
