"""Throwaway rspamd for tests: the packaged daemon with a private config, on a loopback port, offline.

The stock /etc/rspamd/rspamd.conf is kept and its local folders are pointed at a temp dir with
--var, so /etc is not touched. DNS goes to 127.0.0.1:53 with a short timeout (nothing answers
there) and fake records decide SPF and DMARC for the test domains; the modules that would reach
out (RBLs, fuzzy, URL lookups, ...) are turned off. Test tokens in a message force rspamd's action.

Domains: spf-pass.test allows 192.0.2.10 only (-all) and publishes DMARC p=reject, so mail from
192.0.2.10 passes SPF and DMARC and mail from elsewhere fails both; nospf.test has neither record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
ADD_HEADER = b"XCARESERVICE-TEST-ADDHEADER"
GREYLIST = b"XCARESERVICE-TEST-GREYLIST"
SOFT_REJECT = b"XCARESERVICE-TEST-SOFTREJECT"
SPF_PASS_IP = "192.0.2.10"
READY_TIMEOUT = 60.0  # the first start compiles hyperscan caches: 9-12 s, more on a busy machine
STOP_TIMEOUT = 10.0

_OPTIONS = """
disable_monitoring = true;
hs_cache_dir = "{cache}/";
dns {{
  nameserver = ["127.0.0.1:53"];
  timeout = 0.1s;
  retransmits = 0;
  fake_records = [
    {{ name = "spf-pass.test"; type = "txt"; replies = ["v=spf1 ip4:192.0.2.10 -all"]; }},
    {{ name = "_dmarc.spf-pass.test"; type = "txt"; replies = ["v=DMARC1; p=reject"]; }},
    {{ name = "nospf.test"; type = "txt"; rcode = "nxdomain"; }},
    {{ name = "_dmarc.nospf.test"; type = "txt"; rcode = "nxdomain"; }}
  ];
}}
"""
# Each token forces its action before the other rules run (a prefilter's pre-result).
_TOKENS_LUA = """
for tok, act in pairs({ ['XCARESERVICE-TEST-ADDHEADER'] = 'add header', ['XCARESERVICE-TEST-GREYLIST'] = 'greylist',
                        ['XCARESERVICE-TEST-SOFTREJECT'] = 'soft reject' }) do
  local sym = 'XCARE_TEST_' .. tok:sub(19)
  rspamd_config:register_symbol({ name = sym, type = 'prefilter', priority = 10, score = 0.0, callback = function(task)
    if tostring(task:get_content()):find(tok, 1, true) then
      task:insert_result(sym, 1.0, tok)
      task:set_pre_result{ action = act, message = 'test token', module = 'xcare' }
    end end })
end
"""
# The README's advice for an rspamd that sees customer mail: its scan lines (level notice and info) carry the
# Message-ID, client address and envelope by default, and its warnings name the HELO, the sender's domain,
# the domains of links in the text and attachments' file names, so log errors only.
PRIVATE_LOGGING = 'level = "error";\n'
# and the modules whose own lines name the sender, turned off (local.d/<module>.conf): dkim_signing and arc sign
# local and authenticated mail by default and log the sender's domain when they find no key for it; asn and
# once_received log the client's address at error when its DNS lookup fails
PRIVATE_OFF = ("dkim_signing.conf", "arc.conf", "asn.conf", "once_received.conf")
_NETWORK_MODULES = ("fuzzy_check", "rbl", "surbl", "asn", "phishing", "hfilter", "url_redirector", "neural",
                    "whitelist", "mime_types", "multimap", "mid")


def rspamd_binary() -> str | None:
    return shutil.which("rspamd") or next((p for p in ("/usr/bin/rspamd", "/usr/sbin/rspamd") if os.access(p, os.X_OK)),
                                          None)


@dataclass
class RspamdServer:
    """One running rspamd (normal worker only) answering on `url`."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "log" / "stdout.log"

    def logged(self) -> str:
        """Everything rspamd wrote to its log folder so far (its own log and its stdout)."""
        return "".join(path.read_text(errors="replace") for path in (self.root / "log").iterdir())

    def check(self, raw: bytes, sender: str, ip: str = SPF_PASS_IP) -> dict[str, object]:
        """rspamd's own answer for `raw`, asked directly (to compare the service's reading with)."""
        request = urllib.request.Request(f"{self.url}/checkv2", data=raw, method="POST", headers={
            "From": sender, "Rcpt": "care@ticketnest.test", "IP": ip, "Helo": "mail.example.org",
            "Hostname": "mail.example.org"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        """SIGTERM the main process, then kill the whole group (its workers outlive a killed main)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(STOP_TIMEOUT)


def start_rspamd(root: Path, cache: Path) -> RspamdServer:
    """Start rspamd with its config, database, run and log folders under `root`; `cache` keeps the compiled
    hyperscan databases between runs. Raises RuntimeError (with the log's end) if it does not answer /ping in time."""
    binary = rspamd_binary()
    if binary is None:
        raise RuntimeError("rspamd not installed")
    etc = root / "etc"
    for folder in (etc / "local.d", etc / "override.d", root / "db", root / "run", root / "log", cache):
        folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (etc / "local.d" / "options.inc").write_text(_OPTIONS.format(cache=cache))
    (etc / "local.d" / "logging.inc").write_text(PRIVATE_LOGGING)
    for name in PRIVATE_OFF:
        (etc / "local.d" / name).write_text("enabled = false;\n")
    (etc / "override.d" / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
    for worker in ("worker-controller.inc", "worker-proxy.inc"):
        (etc / "override.d" / worker).write_text("enabled = false;\n")
    (etc / "rspamd.conf.override").write_text("".join(f"{m} {{ enabled = false; }}\n" for m in _NETWORK_MODULES))
    (etc / "rspamd.local.lua").write_text(_TOKENS_LUA)
    user = ["-i"] if os.geteuid() == 0 else []  # as root rspamd wants a user to switch to, or -i to stay root
    command = [binary, "-f", *user, "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={etc}",
               f"--var=DBDIR={root / 'db'}", f"--var=RUNDIR={root / 'run'}", f"--var=LOGDIR={root / 'log'}"]
    with (root / "log" / "stdout.log").open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True)
    server = RspamdServer(root, port, proc)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{server.url}/ping", timeout=1) as reply:
                if b"pong" in reply.read():
                    return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    tail = server.log.read_text(errors="replace")[-2000:]
    server.stop()
    raise RuntimeError(f"rspamd did not answer /ping within {READY_TIMEOUT} s: {tail}")
