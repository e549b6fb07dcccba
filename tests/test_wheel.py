"""What the operator runs: the wheel built from this tree, installed into a fresh venv, run from / with a
config outside the checkout. A wheel without its templates or stages fails here, not in production."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import customer_mail
from tests.support import free_port
from tests.support import send
from tests.support import wait_for

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "var", "dev-outbox", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built (like an operator would, with pip) from a copy of the source tree."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, work / "careservice", ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"),
                    str(work / "careservice")], check=True, timeout=300, capture_output=True)
    [built] = (work / "dist").glob("careservice-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies come from the test venv's site-packages
    (a path in a .pth file), so the test needs no package index and sees nothing of the checkout."""
    root = tmp_path_factory.mktemp("venv") / "careservice"
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300, capture_output=True)
    return root


def test_the_wheel_holds_stages_and_templates_inside_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"careservice", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for needed in ("careservice/handlers/__init__.py", "careservice/handlers/forward.py",
                   "careservice/templates/mail/en/forward.txt", "careservice/templates/mail/de/ack.txt",
                   "careservice/templates/web/en/form.html", "careservice/templates/web/layout/base.html"):
        assert needed in names


def test_installed_wheel_runs_from_root_with_config_in_etc(installed: Path, tmp_path: Path) -> None:
    bin_dir = installed / "bin"
    where = subprocess.run([str(bin_dir / "python"), "-c", "import careservice.handlers as h; print(h.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/").stdout
    assert where.startswith(str(installed)), where  # not the checkout
    relay = CaptureRelay().start()
    etc, state = tmp_path / "etc" / "careservice", tmp_path / "var" / "lib" / "careservice"
    etc.mkdir(parents=True)
    smtp_port = free_port()
    config = etc / "config.toml"
    config.write_text(f"""
[service]
data_dir = "{state}"
[security]
master_key_file = "{etc / 'master.key'}"
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "care.test"
min_free_bytes = 1
[relay]
url = "smtp://127.0.0.1:{relay.port}"
[web]
listen = "127.0.0.1:{free_port()}"
[admin]
listen = "127.0.0.1:{free_port()}"
[[sites]]
id = "ticketnest"
name = "TicketNest"
domain = "ticketnest.test"
care_address = "{CARE}"
staff = ["{STAFF}"]
""")
    version = subprocess.run([str(bin_dir / "careservice"), "--version"], capture_output=True, text=True, cwd="/")
    assert version.returncode == 0 and version.stdout.startswith("careservice ")
    check = subprocess.run([str(bin_dir / "careservice"), "check", "--config", str(config)], capture_output=True,
                           text=True, cwd="/")
    assert check.returncode == 0, check.stderr
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen([str(bin_dir / "careservice"), "run", "--config", str(config)], cwd="/",
                            stdout=log, stderr=log, preexec_fn=lambda: os.umask(0o022),
                            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    try:
        def listening() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            try:
                send(smtp_port, "bob@customer.example", [CARE], customer_mail("Wheel", "from the wheel",
                                                                            sender="bob@customer.example"))
                return True
            except OSError:
                return False

        wait_for(listening, what="the installed daemon to accept mail")
        wait_for(lambda: relay.to(STAFF) and relay.to("bob@customer.example"), what="forward and acknowledgement")
        assert "from the wheel" in relay.to(STAFF)[0].message.get_body(("plain",)).get_content()
        status = subprocess.run([str(bin_dir / "careservice"), "status", "--json", "--config", str(config)],
                                capture_output=True, text=True, cwd="/", check=True)
        assert json.loads(status.stdout)["open_cases"] == 1
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir() if p.is_file()}
        assert {"cases.db", "keys.db", "cases.db-wal", "keys.db-wal"} <= set(files), files
        assert {name: mode for name, mode in files.items() if mode != 0o600} == {}
        [metrics] = (state / "metrics").iterdir()  # this run's folder: prometheus_client's files of both processes
        assert stat.S_IMODE((state / "metrics").stat().st_mode) == stat.S_IMODE(metrics.stat().st_mode) == 0o700
        assert any(metrics.iterdir())
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in metrics.iterdir() if p.stat().st_mode & 0o077} == {}
        assert stat.S_IMODE((etc / "master.key").stat().st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
        relay.stop()
        log.close()
    assert code == 0
    text = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in text and "ERROR" not in text, text
