"""Three nodes on one PostgreSQL, kill -9 under load: customer mails spread over the nodes' SMTP ports
and staff answers flow while one node after another is SIGKILLed (its intake and its worker) and
restarted. Every 250 ends in a forward or an answer, duplicates stay within one per kill, and at the
end nothing of any case is left in either database. Then: a PostgreSQL restart under the same load.

The mail count scales with CARESERVICE_RELIABILITY_SCALE (150 per unit: 20 = the issue's 3,000)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path

import pytest

from careservice.crypto import Keyring
from careservice.settings import StoreConfig
from careservice.store import Store
from careservice.store import read_status
from careservice.store.pg.claims import ORPHAN_KEY_AGE
from tests.postgres import Postgres
from tests.postgres import case_rows
from tests.postgres import with_store
from tests.reliability.helpers import IDLE
from tests.reliability.helpers import SCALE
from tests.reliability.helpers import children
from tests.reliability.helpers import log_leaks
from tests.reliability.helpers import set_keys
from tests.reliability.test_kill import GIVE_UP
from tests.reliability.test_kill import SEED
from tests.reliability.test_kill import SENDERS
from tests.reliability.test_kill import Load
from tests.reliability.test_kill import settled
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability

MAILS = 150 * SCALE
NODES = 3
KILL_EVERY = (1.5, 4.0)  # seconds between two kills
LEASE = 10  # seconds: a dead node's claims are taken over soon, a live node's slowest send here ends first


@dataclass
class ClusterLoad(Load):
    """The kill test's load, each attempt on the next node: a client of several MX hosts."""

    nodes: list[Daemon] = field(default_factory=list)
    turn: Iterator[int] = field(default_factory=itertools.count)

    def port(self) -> int:
        return self.nodes[next(self.turn) % len(self.nodes)].smtp_port

    def until(self, mails: int) -> None:
        """Stop new customer mail once `mails` were offered."""
        while not self.stop_new.is_set():
            if self.sent >= mails:
                self.stop_new.set()
            time.sleep(0.05)


def cluster(tmp_path: Path, relay: CaptureRelay, store: StoreConfig) -> list[Daemon]:
    """NODES daemons, each with its own data_dir and ports, one database and one master key. Each sends over
    one relay connection: a node killed mid-send then leaves at most one mail sent and not recorded, which
    another node sends again (with more connections, up to that many per kill)."""
    store = replace(store, lease_seconds=LEASE)
    configs = [with_store(set_keys(write_config(tmp_path / f"node{i}", relay.port, retry_delays="[1]"), "relay",
                                   connections=1), store)
               for i in range(NODES)]
    nodes = [Daemon(configs[0]).start()]  # it makes the master key the others get
    for config in configs[1:]:
        shutil.copy2(configs[0].parent / "master.key", config.parent / "master.key")
        nodes.append(Daemon(config).start())
    return nodes


def kill_node(node: Daemon, restart: bool = True) -> None:
    """kill -9 of the node's processes (the daemon and its worker) at once, then a restart."""
    assert node.proc is not None
    for pid in [*children(node.proc.pid), node.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    node.proc.wait(5)
    node.proc = None
    if restart:
        node.start()


def drain(load: ClusterLoad, store: StoreConfig, data_dir: Path) -> dict[str, object]:
    """Answer what is still open until the cluster is idle (bounded); the final counts."""
    deadline = time.monotonic() + 180
    counts: dict[str, object] = {}
    while time.monotonic() < deadline:
        counts = read_status(data_dir, store)
        counts.pop("imap", None)
        if counts == IDLE:
            break
        load.answer_new_forwards()
        time.sleep(0.3)
    return counts


async def sweep_later(store: StoreConfig, node: Daemon) -> None:
    sweeper = Store(node.data_dir, Keyring.load(node.config.parent / "master.key", create=False), backend=store)
    await sweeper.start(sweep=False)
    try:
        await sweeper.sweep_orphans(time.time() + ORPHAN_KEY_AGE + 1)
    finally:
        await sweeper.close()


def run_load(tmp_path: Path, relay: CaptureRelay, store: StoreConfig, disturb: object) -> None:
    nodes = cluster(tmp_path, relay, store)
    load = ClusterLoad(nodes[0], relay, nodes=nodes)
    threads = [threading.Thread(target=load.customers, args=(i,)) for i in range(SENDERS)]
    threads += [threading.Thread(target=load.staff), threading.Thread(target=load.until, args=(MAILS,))]
    try:
        for thread in threads:
            thread.start()
        kills = disturb(nodes, load)  # type: ignore[operator]
        for thread in threads:
            thread.join(GIVE_UP + 30)
        assert not load.errors, load.errors[:5]
        counts = drain(load, store, nodes[0].data_dir)
    finally:
        load.stop_new.set()
        for node in nodes:
            node.stop()
    settled(load, f"{NODES} nodes: seed={SEED} kills={kills}", kills, counts)
    # a node killed between its two commits (keys first) may leave a key without rows, for no 250 was
    # given; the sweep takes such keys once no commit can still be in progress: let it run as if then
    asyncio.run(sweep_later(store, nodes[0]))
    assert case_rows(store, nodes[0].data_dir) == 0  # no row of any case in either database
    for node in nodes:
        assert log_leaks(node, ["kill-c", "kill-a", "@customer.example", "Name kill"]) == []


def test_three_nodes_one_killed_after_another_lose_nothing(tmp_path: Path, relay: CaptureRelay,
                                                           pg_store: StoreConfig) -> None:
    rng = random.Random(SEED)

    def kill_nodes(nodes: list[Daemon], load: ClusterLoad) -> int:
        kills: Counter[int] = Counter()
        while not load.stop_new.is_set():
            time.sleep(rng.uniform(*KILL_EVERY))
            victim = rng.randrange(len(nodes))
            kill_node(nodes[victim])
            kills[victim] += 1
        return sum(kills.values())

    run_load(tmp_path, relay, pg_store, kill_nodes)


def test_a_postgresql_restart_under_load_loses_nothing(tmp_path: Path, relay: CaptureRelay, postgres: Postgres,
                                                       pg_store: StoreConfig) -> None:
    def restart_database(nodes: list[Daemon], load: ClusterLoad) -> int:
        wait_for(lambda: load.sent >= MAILS // 3, timeout=120, what="a third of the mail offered")
        postgres.stop()
        time.sleep(2)
        postgres.start()
        return 1  # a restart may cut a delivery the relay took before its record: at most one repeat each

    run_load(tmp_path, relay, pg_store, restart_database)
