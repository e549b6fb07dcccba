"""Pieces of the metrics and statistics in-process: time-to-answer bands, and the idle relay probe."""

from __future__ import annotations

import math
import os
import stat
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from careservice import metrics
from careservice import tta
from careservice.outbox import Outbox
from careservice.outbox import Relay
from tests.support import free_port
from tests.test_outbox import CountingRelay
from tests.test_outbox import relay_config


def test_time_to_answer_bands_give_exact_shares_and_an_estimated_median() -> None:
    assert [tta.bucket_name(s) for s in (0, 299, 300, 3599, 3600, 14399, 86399, 86400, 7 * 86400)] == [
        "tta_0_5m", "tta_0_5m", "tta_5m_15m", "tta_30m_1h", "tta_1h_2h", "tta_2h_4h", "tta_8h_1d", "tta_1d_3d",
        "tta_7d_up"]
    # five answers: 2 within 1 h, 3 within 4 h, 4 within 24 h
    day = Counter(tta.bucket_name(seconds) for seconds in (100, 2000, 5000, 20000, 90000))
    assert [tta.share_within(day, s) for s in (3600, 4 * 3600, 86400)] == [0.4, 0.6, 0.8]
    assert tta.median(day) == 5400  # the 2.5th of 5 answers: half way through the 1 h - 2 h band
    assert tta.median({}) is None and tta.share_within({}, 3600) is None
    assert tta.median({"tta_7d_up": 3}) == 7 * 86400  # the open last band: its lower bound
    # the first release's coarse bands still read; 1 h - 24 h is spread evenly over its band
    assert tta.share_within({"tta_lt_1h": 1, "tta_lt_1d": 1}, 3600) == 0.5
    assert math.isclose(tta.share_within({"tta_lt_1d": 23}, 4 * 3600) or 0, 3 / 23)


def relay_up() -> float | None:
    registry = CollectorRegistry()
    registry.register(metrics.relay_gauge())
    return registry.get_sample_value("careservice_relay_up")


async def test_an_idle_relay_is_probed_for_relay_up(tmp_path: Path) -> None:
    server = CountingRelay().start()
    try:
        clock = [1000.0]
        outbox = Outbox(relay_config(server.port), None, Relay(relay_config(server.port), ""),  # type: ignore[arg-type]
                        lambda: clock[0], lambda event, item, failure: None, 1_000_000)
        await outbox.check_relay()
        assert relay_up() == 1  # it greeted us (and got a QUIT)
    finally:
        server.stop()
    await outbox.check_relay()
    assert relay_up() == 0
    assert await Relay(relay_config(free_port()), "").reachable() is False
    maildir = relay_config(0)
    assert await Relay(maildir.__class__(**{**maildir.__dict__, "maildir": tmp_path / "out"}), "").reachable()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cur", "new", "tmp"]


def test_a_metric_that_cannot_be_written_does_not_fail_its_caller(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The multiprocess file of a new label is created at its first use: with data_dir moved away under a
    running daemon that raised inside the SMTP session's reply and closed the client's connection."""
    class Unwritable:
        def inc(self, amount: float = 1) -> None:
            raise FileNotFoundError("metrics folder gone")

    monkeypatch.setattr(metrics, "_smtp_code", lambda code: Unwritable())
    metrics.smtp_reply("451 4.3.0 Temporary failure")
    metrics.smtp_reply("451 4.3.0 Temporary failure")
    assert len([r for r in caplog.records if r.getMessage().startswith("metrics_failed")]) <= 1  # once a minute


def test_a_metric_file_not_yet_sized_does_not_fail_the_scrape(tmp_path: Path) -> None:
    """A process creates its metric file before sizing it; a scrape in between (or after the process died
    there) failed the whole /metrics with a 500."""
    from prometheus_client.mmap_dict import MmapedDict
    from prometheus_client.mmap_dict import mmap_key
    from prometheus_client.multiprocess import MultiProcessCollector

    written = MmapedDict(str(tmp_path / "counter_101.db"))
    written.write_value(mmap_key("careservice_x", "careservice_x_total", (), (), "x"), 3.0, 0.0)
    written.close()
    (tmp_path / "counter_102.db").touch()  # created, not yet sized
    with pytest.raises(struct.error):  # the library's own collector: the whole merge fails
        list(MultiProcessCollector(None, path=str(tmp_path)).collect())
    registry = CollectorRegistry()
    metrics.ProcessFiles(registry, path=str(tmp_path))
    assert registry.get_sample_value("careservice_x_total") == 3.0


def test_each_process_allocates_its_metric_files_before_writing(tmp_path: Path) -> None:
    """Sparse files written through mmap killed the worker with SIGBUS when the disk was full."""
    code = ("from careservice import metrics\n"
            "metrics.received('smtp', 1, 0.01)\nmetrics.relay_up(True)\nimport os\nprint(os.getpid())")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pid = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip()
    files = sorted(tmp_path.glob(f"*_{pid}.db"))
    assert [f.name.rsplit("_", 1)[0] for f in files] == sorted(metrics.FILE_KINDS)
    for file in files:
        stat = file.stat()
        assert stat.st_blocks * 512 >= stat.st_size >= metrics.FILE_BYTES, file.name  # not sparse
        assert stat.st_mode & 0o777 == 0o600
    registry = CollectorRegistry()
    metrics.ProcessFiles(registry, path=str(tmp_path))
    assert registry.get_sample_value("careservice_messages_received_total", {"channel": "smtp"}) == 1.0


def _share_metrics(data_dir: Path) -> Path:
    """`careservice run`'s metrics folder for a new run (in a process of its own: prometheus_client is
    imported here already, and the folder must be set before its first import)."""
    code = ("import os, sys\nfrom pathlib import Path\nfrom careservice import cli\n"
            "cli._share_metrics(Path(sys.argv[1]))\nprint(os.environ['PROMETHEUS_MULTIPROC_DIR'])")
    run = subprocess.run([sys.executable, "-c", code, str(data_dir)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-500:]
    return Path(run.stdout.strip())


def test_a_restart_gets_an_empty_metrics_folder_while_the_old_worker_still_writes(tmp_path: Path) -> None:
    """After a kill -9 of the daemon its worker lives on for a moment and may make metric files: the
    restart must neither fail on them ("File exists") nor count them."""
    data_dir = tmp_path / "data"
    old = _share_metrics(data_dir)
    stop = threading.Event()

    def old_worker() -> None:
        for n in range(1_000_000):  # bounded; stopped once the restarts are done
            if stop.is_set():
                return
            try:
                (old / f"counter_{n}.db").touch()
            except FileNotFoundError:  # its folder is gone
                return

    writer = threading.Thread(target=old_worker)
    writer.start()
    try:
        news = [_share_metrics(data_dir) for _ in range(5)]
    finally:
        stop.set()
        writer.join(30)
    assert all(new.parent == data_dir / "metrics" and new != old for new in news)
    assert list(news[-1].iterdir()) == [] and stat.S_IMODE(news[-1].stat().st_mode) == 0o700
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert [p for p in (data_dir / "metrics").iterdir() if p not in (old, news[-1])] == []  # earlier runs removed
