"""service.event_loop: both processes on the loop asked for (uvloop by default), a config error for anything else."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from careservice.config import ConfigError
from careservice.config import load_config
from tests.reliability.helpers import RawSmtp
from tests.reliability.helpers import set_keys
from tests.support import CARE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import wait_for
from tests.support import write_config

CUSTOMER = "alice@customer.example"


def test_the_default_loop_is_uvloop_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    assert load_config(config).event_loop == "uvloop"
    with pytest.raises(ConfigError, match="tokio") as raised:
        load_config(set_keys(config, "service", event_loop="tokio"))
    assert raised.value.key == "service.event_loop"


def _maps_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension module loaded."""
    return "uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_both_processes_run_on_the_loop_asked_for_and_a_case_goes_through(tmp_path: Path, relay: CaptureRelay,
                                                                          loop: str) -> None:
    config = set_keys(write_config(tmp_path, relay.port), "service", event_loop=loop)
    daemon = Daemon(config).start()
    try:
        send(daemon.smtp_port, CUSTOMER, [CARE], customer_mail("Lost tickets", "Order 4711 is lost"))
        wait_for(lambda: relay.to(STAFF) and relay.to(CUSTOMER), what="forward and ack")
        assert daemon.proc is not None
        workers = _children(daemon.proc.pid)
        assert workers
        assert [_maps_uvloop(pid) for pid in (daemon.proc.pid, *workers)] == [loop == "uvloop"] * (1 + len(workers))
    finally:
        daemon.stop()


def _all_greeted(port: int, count: int) -> bool:
    """Whether `count` new sessions from 127.0.0.1 all get a 220 (each closed again after its greeting)."""
    sessions = [RawSmtp(port, timeout=5) for _ in range(count)]
    for session in sessions:
        session.sock.close()
    return all(s.greeting.startswith(b"220") for s in sessions)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_hangs_up_before_the_greeting_gives_its_slot_back(tmp_path: Path, loop: str) -> None:
    """On uvloop the connect and the EOF can arrive in one turn: the session must still close and leave."""
    config = set_keys(write_config(tmp_path, 1), "smtp", max_connections_per_client=3)
    daemon = Daemon(set_keys(config, "service", event_loop=loop)).start()
    try:
        for _ in range(3):
            socket.create_connection(("127.0.0.1", daemon.smtp_port)).close()
        wait_for(lambda: _all_greeted(daemon.smtp_port, 3), timeout=10, what="three slots free again")
    finally:
        assert daemon.stop() == 0
