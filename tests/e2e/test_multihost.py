"""More than one machine (CONTRACT §10): ingress and projection on separate hosts, hosts killed
under load, nothing lost and nothing projected twice.

Eight hosts, each a network namespace on a bridge of the test's own (tests/e2e/netns.py):

- ``db``: a private PostgreSQL 15 cluster listening on the bridge (and on a Unix socket in the
  test's directory, through which the test itself reads);
- ``lb``: HAProxy in front of the two ingress hosts, with health checks;
- ``i1``, ``i2``: `mirror serve --no-projector`;
- ``p1``, ``p2``, ``p3``: `mirror project`;
- ``snd``: a sender that behaves like Svix (tests/e2e/svix_sender.py): a steady signed load,
  every message retried on non-2xx and on timeouts under the same svix-id until acknowledged.

While the load runs, the mirror processes of a random ingress or projection host are SIGKILLed
and started again, several times. Then: every acknowledged event is in the log exactly once;
every event is projected exactly once (the checkpoints cover every event, one received state
per projectable event, nothing poisoned); the relations equal a single-process `mirror rebuild`
of the same log; the lag drains; the partitions end up shared by the three live projection
hosts, as the view and `mirror status` show.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mirror.db import init_connection, migrate
from mirror.rebuild import rebuild
from tests.conftest import API_TOKEN, SECRET
from tests.e2e.harness import wait_projected
from tests.e2e.netns import Host, Network
from tests.e2e.replication import PG_BIN, Cluster, as_postgres
from tests.logtools import snapshot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000          # every ingress host's port
LB_PORT = 8080
RATE = 40.0          # new messages a second
LOAD_SECONDS = 60.0


class MultiHostRig:
    """The hosts, the cluster and the processes of one test; ``close`` removes them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.network = Network()
        self.root = Path(tempfile.mkdtemp(prefix="mirror-hosts-"))
        self.cluster: Cluster | None = None
        self.mirror: dict[str, subprocess.Popen[bytes]] = {}
        self.hosts: dict[str, Host] = {}

    # -- building ------------------------------------------------------------------------
    def build(self) -> MultiHostRig:
        net = self.network.up()
        for role, octet in (("db", 2), ("lb", 3), ("snd", 4), ("i1", 11), ("i2", 12),
                            ("p1", 21), ("p2", 22), ("p3", 23)):
            self.hosts[role] = net.host(role, octet)
        self._postgres()
        asyncio.run(self._create_database())
        self._haproxy()
        for role in ("i1", "i2", "p1", "p2", "p3"):
            self.start(role)
        return self

    def _postgres(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        cluster = Cluster(self.root, "pg")
        cluster.port = 5432  # its own host: the usual port
        self.cluster = cluster
        cluster.initdb()
        cluster.configure(listen_addresses=self.hosts["db"].address, max_connections="200",
                          shared_buffers="64MB")
        with open(cluster.data / "pg_hba.conf", "a") as hba:  # the hosts on the bridge
            hba.write(f"host all all {self.hosts['db'].address}/24 trust\n")
        db = self.hosts["db"]
        done = db.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(cluster.data), "-l",
                                   str(cluster.logfile), "-w", "-t", "60", "start"]), 90)
        assert done.returncode == 0, f"{done.stdout}{done.stderr}{cluster.log()}"
        cluster.processes.add(cluster.postmaster_pid())

    def local_url(self, database: str = "mirror") -> str:
        """The cluster through its Unix socket, for the test itself (outside every host)."""
        return f"postgresql://postgres@/{database}?host={self.root}&port=5432"

    @property
    def host_url(self) -> str:
        """The cluster as the hosts reach it, over the bridge."""
        return f"postgresql://postgres@{self.hosts['db'].address}:5432/mirror"

    async def _create_database(self) -> None:
        conn = await asyncpg.connect(self.local_url("postgres"))
        try:
            await conn.execute("CREATE DATABASE mirror")
        finally:
            await conn.close()
        conn = await asyncpg.connect(self.local_url())
        try:
            await init_connection(conn)
            await migrate(conn)
        finally:
            await conn.close()

    def _haproxy(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            raise RuntimeError("haproxy not found (Debian package haproxy; make test-slow "
                               "installs it)")
        config = self.workdir / "haproxy.cfg"
        servers = "\n".join(f"    server {r} {self.hosts[r].address}:{PORT} check"
                            for r in ("i1", "i2"))
        config.write_text(f"""
global
    maxconn 2000
    stats socket {self.workdir / "haproxy.sock"} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 15s
    timeout check 1s
    retries 3
    option redispatch
frontend webhooks
    bind {self.hosts["lb"].address}:{LB_PORT}
    default_backend ingress
backend ingress
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 300ms fall 2 rise 2
{servers}
""")
        check = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.hosts["lb"].popen([haproxy, "-db", "-f", str(config)], env=os.environ,
                               log=self.workdir / "haproxy.log")

    # -- the mirror processes ------------------------------------------------------------
    def start(self, role: str) -> None:
        host = self.hosts[role]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
               "DATABASE_URL": self.host_url, "MIRROR_WEBHOOK_SECRET": SECRET,
               "MIRROR_API_TOKEN": API_TOKEN, "MIRROR_LOG_LEVEL": "WARNING"}
        if role.startswith("i"):
            metrics = self.workdir / f"metrics-{role}"
            shutil.rmtree(metrics, ignore_errors=True)  # left by a killed process
            metrics.mkdir()
            env |= {"MIRROR_HOST": host.address, "MIRROR_PORT": str(PORT),
                    "MIRROR_INGRESS_PROCESSES": "1", "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
            command = [sys.executable, "-m", "mirror", "serve", "--no-projector"]
        else:
            command = [sys.executable, "-m", "mirror", "project", "--workers", "1"]
        self.mirror[role] = host.popen(command, env=env, log=self.workdir / f"{role}.log",
                                       cwd=self.workdir)

    def kill(self, role: str) -> None:
        proc = self.mirror[role]
        assert proc.poll() is None, f"{role} had died by itself:\n{self.log(role)}"
        Host.kill(proc)

    def log(self, role: str) -> str:
        path = self.workdir / f"{role}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def haproxy_stats(self) -> dict[str, dict[str, str]]:
        """The ingress servers as HAProxy sees them (state, answers by class)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.workdir / "haproxy.sock"))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r.get("pxname") == "ingress"}

    def close(self) -> None:
        # The cluster first, by pg_ctl (it then frees its shared memory), then every process
        # and namespace of the hosts.
        if self.cluster is not None:
            self.cluster.close()
        self.network.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[MultiHostRig]:
    if os.geteuid() != 0:
        pytest.skip("the multi-host rig needs root (ip netns); CI runs as root")
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL 15 server binaries not found in {PG_BIN} "
                           "(Debian package postgresql-15; make test-slow installs it)")
    built = MultiHostRig(tmp_path)
    try:
        yield built.build()
    finally:
        for role in ("i1", "i2", "p1", "p2", "p3", "haproxy"):  # shown when the test fails
            print(f"--- {role}.log\n{built.log(role)}")
        if built.cluster is not None:
            print(f"--- postgresql.log\n{built.cluster.log()}")
        built.close()
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        assert built.network.token not in leftover.stdout


async def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def value(url: str, sql: str, *args: Any) -> Any:
    return asyncio.run(query(url, sql, *args))[0][0]


def pids(url: str) -> dict[str, int]:
    """The pid of the process holding each projection host's partitions."""
    return {r["host"]: r["pid"] for r in asyncio.run(query(
        url, "SELECT DISTINCT host, pid FROM mirror.partition_owners WHERE owner IS NOT NULL"))}


def wait_until(check: Any, what: str, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_hosts_killed_under_load_lose_nothing_and_project_everything_once(
        rig: MultiHostRig, tmp_path: Path) -> None:
    seed = int(os.environ.get("MIRROR_RIG_SEED", random.randrange(1 << 30)))
    print(f"\nmulti-host rig seed {seed} (MIRROR_RIG_SEED to replay)")
    rng = random.Random(seed)
    url = rig.local_url()
    out = tmp_path / "sender"
    out.mkdir()

    # The three projection hosts share the partitions.
    def owners() -> dict[str, int]:
        return {r["host"]: r["n"] for r in asyncio.run(query(
            url, "SELECT host, count(*) AS n FROM mirror.partition_owners "
                 "WHERE owner IS NOT NULL GROUP BY host"))}

    wait_until(lambda: set(owners()) == {"p1", "p2", "p3"} and sum(owners().values()) == 128,
               "three projection hosts to share the partitions", 60)
    first_pids = pids(url)

    sender = rig.hosts["snd"].popen(
        [sys.executable, "-m", "tests.e2e.svix_sender",
         f"http://{rig.hosts['lb'].address}:{LB_PORT}/webhooks", str(RATE), str(LOAD_SECONDS),
         str(out)],
        env={**os.environ, "MIRROR_WEBHOOK_SECRET": SECRET}, log=tmp_path / "sender.log",
        cwd=ROOT, stdout=subprocess.PIPE)
    assert sender.stdout is not None
    assert sender.stdout.readline().strip() == b"ready", (tmp_path / "sender.log").read_text()
    load_started = time.monotonic()

    # Faults: SIGKILL a host's mirror processes mid-load and start them again; eight times,
    # in a random order, every ingress and projection host at least once.
    plan = ["i1", "i2", rng.choice(["i1", "i2"]), rng.choice(["i1", "i2"]),
            "p1", "p2", "p3", rng.choice(["p1", "p2", "p3"])]
    rng.shuffle(plan)
    killed: list[str] = []
    time.sleep(5)
    for role in plan:
        lag = value(url, "SELECT count(*) FROM mirror.unprojected_events")
        rig.kill(role)
        killed.append(f"{role} (lag {lag})")
        time.sleep(rng.uniform(0.2, 2.0))
        rig.start(role)
        time.sleep(rng.uniform(2.5, 5.0))
    print(f"killed and restarted: {', '.join(killed)}; "
          f"faults took {time.monotonic() - load_started:.0f} s of the load")

    stdout, _ = sender.communicate(timeout=LOAD_SECONDS + 200)
    assert sender.returncode == 0, (tmp_path / "sender.log").read_text()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    load_ended = time.monotonic()
    print(f"sender: {summary}")
    sent = set((out / "sent").read_text().split())
    acked = set((out / "acked").read_text().split())
    assert summary["gave_up"] == 0 and len(acked) == summary["acked"] == len(sent)
    assert summary["messages"] >= RATE * LOAD_SECONDS * 0.9
    # Retries and re-deliveries: the log still holds each message once (below).
    assert summary["answers"]["attempts"] > summary["messages"]

    # Every acknowledged event is in the log exactly once, and nothing else is.
    logged = [r["event_id"] for r in asyncio.run(query(url, "SELECT event_id FROM mirror.events"))]
    assert len(logged) == len(set(logged))
    assert set(logged) == acked

    # The lag drains.
    asyncio.run(wait_projected(url, timeout=120))
    drained = time.monotonic() - load_ended
    print(f"{len(logged)} events; lag drained {drained:.1f} s after the load ended")

    # Every event projected exactly once.
    projectable = value(url, "SELECT count(*) FROM mirror.events "
                             "WHERE unusable_reason IS NULL AND resource IS NOT NULL")
    assert projectable == len(logged)
    received = asyncio.run(query(url, "SELECT count(*) AS n, count(DISTINCT position) AS d "
                                      "FROM mirror.states WHERE NOT derived"))[0]
    assert received["n"] == received["d"] == projectable
    assert value(url, "SELECT count(*) FROM mirror.poison") == 0
    assert value(url, "SELECT count(*) FROM mirror.unprojected_events") == 0

    # The live processes, as the view and `mirror status` show them: every host back.
    wait_until(lambda: set(owners()) == {"p1", "p2", "p3"} and sum(owners().values()) == 128,
               "the restarted projection hosts to share the partitions again", 60)
    status = subprocess.run(
        [sys.executable, "-m", "mirror", "status", "--json"], capture_output=True, text=True,
        timeout=60, env={**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
                         "DATABASE_URL": url, "MIRROR_LOG_LEVEL": "WARNING"})
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["partitions"] == 128 and report["projection_lag_events"] == 0
    assert {w["owner"].split(":")[0] for w in report["leases"]} == {"p1", "p2", "p3"}
    assert sorted(p for w in report["leases"] for p in w["parts"]) == list(range(128))
    # The faults landed: HAProxy saw each ingress host go down and come back, and each
    # projection host's partitions are held by a process other than the first one.
    servers = rig.haproxy_stats()
    for role in ("i1", "i2"):
        assert servers[role]["status"].startswith("UP"), servers[role]
        assert int(servers[role]["chkdown"]) >= 1 and int(servers[role]["hrsp_2xx"]) > 0
    last_pids = pids(url)
    assert all(last_pids[h] != first_pids[h] for h in ("p1", "p2", "p3")), \
        (first_pids, last_pids)
    for role, proc in rig.mirror.items():
        assert proc.poll() is None, f"{role} died:\n{rig.log(role)}"

    # The relations equal a single-process rebuild of the same log.
    async def compare() -> None:
        conn = await asyncpg.connect(url)
        await init_connection(conn)
        try:
            live = await snapshot(conn)
            assert sum(len(rows) for rows in live.values()) > len(logged)
            await rebuild(conn)
            assert await snapshot(conn) == live
        finally:
            await conn.close()

    asyncio.run(compare())
    print(f"multi-host rig: {len(logged)} events at {RATE:.0f}/s through 2 ingress hosts, "
          f"{len(killed)} hosts SIGKILLed, {summary['answers']['attempts']} attempts; "
          "every acknowledged event logged once, projected once, rebuild == live")
