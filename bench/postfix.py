"""Postfix's programs as benchmark servers, each on 127.0.0.1 and stopped by its owner.

CSink: Postfix's smtp-sink (C), the cheapest relay. Postfix: a private Postfix instance, queue on
disk, discard transport (the intake baseline a mail administrator knows).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.servers import HOST, MAX_MESSAGE, PySink, Server, alive, stop_process, wait_port
from tests.support import CARE, free_port


def postfix_binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.access(p, os.X_OK)), None)


def ensure_postfix() -> str:
    """Install Debian's postfix when missing and root (without starting a system instance); "" or why not."""
    if postfix_binary("postfix"):
        return ""
    if os.geteuid() != 0:
        return "postfix not installed (and not root to install it)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                   check=False, capture_output=True)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
    print("bench: installing postfix (apt-get) ...", file=sys.stderr, flush=True)
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            return "apt-get install postfix failed"
    if subprocess.run(["postfix", "status"], capture_output=True, check=False).returncode == 0:
        subprocess.run(["postfix", "stop"], capture_output=True, check=False)  # the package's system instance
    return "" if postfix_binary("postfix") else "postfix not found after install"


class CSink(Server):
    """Postfix's smtp-sink: accepts and forgets every message, in C, one process."""

    def __init__(self) -> None:
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return postfix_binary("smtp-sink") is not None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> CSink:
        binary = postfix_binary("smtp-sink")
        assert binary is not None
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self._proc = subprocess.Popen([binary, *user, "-h", "sink.bench.localhost", f"{HOST}:{self.port}", "256"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, lambda: self._proc is not None and self._proc.poll() is None)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None


def relay_sink() -> CSink | PySink:
    """The cheapest relay available: smtp-sink, else a PySink."""
    return CSink() if CSink.available() else PySink()


MASTER_CF = """\
{listen} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
myhostname = postfix.bench.localhost
mydestination = {domain}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
local_transport = discard
default_transport = discard
relay_transport = discard
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
biff = no
message_size_limit = {size}
"""


class Postfix(Server):
    """A private Postfix (own config and queue directories, own port): queue to disk with fsync, then discard."""

    def __init__(self, root: Path, settings: str = "") -> None:
        self.root = root
        self.port = free_port()
        self.conf = root / "conf"
        self.settings = settings  # main.cf lines added to the instance's own

    @staticmethod
    def unavailable() -> str:
        """Why a Postfix instance cannot run here ("" = it can)."""
        if os.geteuid() != 0:
            return "needs root"
        return "" if postfix_binary("postfix") else "postfix not installed"

    @property
    def pid(self) -> int:
        return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])

    def start(self) -> Postfix:
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.root / "queue").mkdir(exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self.root.chmod(0o755)
        shutil.chown(self.root / "data", "postfix")
        (self.conf / "main.cf").write_text(MAIN_CF.format(root=self.root, domain=CARE.split("@")[1],
                                                          size=MAX_MESSAGE * 2) + self.settings)
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"{HOST}:{self.port}"))
        done = subprocess.run(["postfix", "-c", str(self.conf), "start"], capture_output=True, check=False,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stderr.decode(errors='replace')[-300:]}")
        wait_port(self.port)
        return self

    def delivered(self) -> int:
        """Messages the discard agent has disposed of so far."""
        log = self.root / "postfix.log"
        return log.read_bytes().count(b"status=sent") if log.exists() else 0

    def stop(self) -> None:
        if not (self.root / "queue" / "pid" / "master.pid").exists():
            return
        master = self.pid
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True, check=False, timeout=60)
        deadline = time.monotonic() + 30
        while alive(master) and time.monotonic() < deadline:
            time.sleep(0.02)
