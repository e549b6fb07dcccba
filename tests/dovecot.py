"""Throwaway Dovecot IMAP server for tests: real daemon, private config, loopback port."""

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")


class DovecotError(RuntimeError):
    """Dovecot did not start or stop as expected."""


@dataclass
class DovecotServer:
    """A private Dovecot instance (one passwd-file user, one Maildir); stop()/start() keep the mail."""

    host: str
    port: int
    username: str
    password: str
    maildir: Path
    root: Path
    base_dir: Path

    @property
    def config(self) -> Path:
        """The instance's dovecot.conf."""
        return self.root / "dovecot.conf"

    @property
    def log(self) -> Path:
        """Dovecot's log file (daemon log plus startup output)."""
        return self.root / "dovecot.log"

    @property
    def _pid_file(self) -> Path:
        return self.base_dir / "master.pid"

    def client(self) -> IMAPClient:
        """Return an IMAPClient logged in as the test user; use it as a context manager."""
        imap = IMAPClient(self.host, self.port, ssl=False, timeout=10)
        try:
            imap.login(self.username, self.password)
        except BaseException:
            imap.shutdown()
            raise
        return imap

    def append(self, raw: bytes, folder: str = "INBOX") -> None:
        """Append the raw RFC 5322 message to folder."""
        with self.client() as imap:
            imap.append(folder, raw)

    def count(self, folder: str = "INBOX") -> int:
        """Return the number of messages currently in folder."""
        with self.client() as imap:
            imap.select_folder(folder, readonly=True)
            return len(imap.search("ALL"))

    def start(self) -> None:
        """Start the daemon and wait until the test user can log in; on failure stop it and raise."""
        self.base_dir.mkdir(exist_ok=True)
        self.base_dir.chmod(0o755)
        with self.log.open("ab") as out:
            command = [dovecot_binary() or "dovecot", "-c", str(self.config)]
            code = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode
        error = f"dovecot exited with {code}" if code else self._wait_ready()
        if error:
            message = f"{error}; log tail:\n{self.log_tail()}"
            self.stop()
            raise DovecotError(message)

    def stop(self) -> None:
        """Terminate the daemon and all its children (open sessions drop); no-op if not running."""
        try:
            pgid = int(self._pid_file.read_text())
        except FileNotFoundError:
            pgid = None
        if pgid is not None:
            self._kill_group(pgid)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _wait_ready(self) -> str | None:
        """Return None once the test user can log in, else why that failed for READY_TIMEOUT."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                with self.client():
                    return None
            except (OSError, IMAPClientError) as exc:
                if time.monotonic() > deadline:
                    return f"{self.host}:{self.port} not ready after {READY_TIMEOUT:.0f} s ({exc!r})"
                time.sleep(0.1)

    def _kill_group(self, pgid: int) -> None:
        """SIGTERM (then SIGKILL) the master's process group until it is gone and the port is closed."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                if not _group_alive(pgid) and not _port_open(self.host, self.port):
                    return
                time.sleep(0.05)
        raise DovecotError(f"dovecot (pgid {pgid}) still running after SIGKILL; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of the instance's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log written)"


def dovecot_binary() -> str | None:
    """Return the dovecot executable's path, also searching the sbin dirs non-root PATHs lack."""
    return shutil.which("dovecot", path=os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS]))


def start_dovecot(
    tmp_root: Path, *, username: str = "care", password: str = "secret", port: int | None = None,
    introspection_url: str = "",
) -> DovecotServer:
    """Configure and start a private Dovecot in a new folder under tmp_root, listening on 127.0.0.1 only.

    With `introspection_url` it also takes XOAUTH2 and OAUTHBEARER, asking that RFC 7662 endpoint
    whether a bearer token is active and whose it is; the password still works for the test's own logins.

    As root, mail is accessed as `nobody` chrooted into the mail home, so tmp_root's parents
    need not be world-traversable; otherwise everything runs as the current user.
    """
    root = Path(tempfile.mkdtemp(prefix="dc", dir=tmp_root))
    home = root / "mail"
    for folder in (root, root / "state", home):
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)
    server = DovecotServer(
        host="127.0.0.1",
        port=port if port is not None else _free_port(),
        username=username,
        password=password,
        maildir=home / "Maildir",
        root=root,
        # Unix socket paths are limited to 107 bytes, too few below a deep tmp_root: keep sockets short.
        base_dir=Path(tempfile.mkdtemp(prefix="dovecot-")),
    )
    as_root = os.geteuid() == 0
    mail_user = pwd.getpwnam("nobody") if as_root else pwd.getpwuid(os.geteuid())
    os.chown(home, mail_user.pw_uid, mail_user.pw_gid)
    users = root / "users"
    # "<chroot>/./" makes the imap process chroot (as root) into the home before dropping to nobody.
    userdb_home = f"{home}/./" if as_root else str(home)
    users.write_text(
        f"{username}:{{PLAIN}}{password}:{mail_user.pw_uid}:{mail_user.pw_gid}::{userdb_home}::\n"
    )
    users.chmod(0o600)
    oauth2 = ""
    if introspection_url:
        (root / "oauth2.conf.ext").write_text(
            f"introspection_mode = post\nintrospection_url = {introspection_url}\nforce_introspection = yes\n"
            "username_attribute = username\nactive_attribute = active\nactive_value = true\n")
        # a token is first tried as the password (and fails), then introspected
        oauth2 = (f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                  f"  args = {root}/oauth2.conf.ext\n}}\n")
    server.config.write_text(_config(server, users, mail_user, as_root, oauth2))
    server.start()
    return server


def _config(server: DovecotServer, users: Path, mail_user: pwd.struct_passwd, as_root: bool, oauth2: str) -> str:
    """Render dovecot.conf: IMAP only, plaintext auth (and `oauth2`'s passdb), passwd-file users, private dirs."""
    if as_root:
        # auth reads the users file, whose parent folders may be closed to the dovecot user.
        privileges = f"valid_chroot_dirs = {server.maildir.parent}\nservice auth {{\n  user = root\n}}\n"
    else:
        privileges = (
            f"default_login_user = {mail_user.pw_name}\ndefault_internal_user = {mail_user.pw_name}\n"
            f"default_internal_group = {grp.getgrgid(mail_user.pw_gid).gr_name}\n"
            "service imap-login {\n  chroot =\n}\nservice anvil {\n  chroot =\n}\n"
        )
    return f"""\
protocols = imap
listen = {server.host}
base_dir = {server.base_dir}
state_dir = {server.root}/state
log_path = {server.log}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login{" xoauth2 oauthbearer" if oauth2 else ""}
first_valid_uid = 1
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
{oauth2}userdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
service imap-login {{
  inet_listener imap {{
    address = {server.host}
    port = {server.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{privileges}"""


def _free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    """Return True if something accepts TCP connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _group_alive(pgid: int) -> bool:
    """Return True if any non-zombie process belongs to process group pgid."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
