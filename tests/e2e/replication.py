"""PostgreSQL clusters with streaming replication, owned by one test.

``Rig`` builds, in a fresh directory, three PostgreSQL 15 clusters run as the ``postgres`` OS
user (when the tests run as root) on free ports, with the server's own tools:

- ``a``, the primary, with ``synchronous_standby_names = 'b'``: a commit returns only once
  ``b`` has flushed it to disk;
- ``b``, a synchronous standby of ``a`` (``pg_basebackup -R``), the one to promote; it has
  ``synchronous_standby_names = 'c'``, which takes effect once it is promoted, so the new
  primary is protected the same way;
- ``c``, a hot standby streaming from ``b`` (cascading): the read replica. It follows ``b``
  onto its new timeline when ``b`` is promoted.

``Rig.close`` stops every cluster and every process it started, also after a failure, and
removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from tests.e2e.harness import free_port

PG_BIN = Path(os.environ.get("MIRROR_PG_BIN", "/usr/lib/postgresql/15/bin"))


def as_postgres(command: list[str]) -> list[str]:
    """``command`` run as the postgres OS user (PostgreSQL refuses to run as root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


class Cluster:
    """One PostgreSQL cluster in ``root/name`` listening on 127.0.0.1 and a free port."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.port = free_port()
        self.data = root / name
        self.logfile = root / f"{name}.log"
        self.processes: set[int] = set()

    def url(self, database: str = "mirror") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tool(self, name: str, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(as_postgres([str(PG_BIN / name), *args]), capture_output=True,
                              text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}\n{self.log()}")
        return done.stdout

    def configure(self, **settings: str) -> None:
        """Append settings to postgresql.auto.conf (read last, so these win)."""
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = '{value}'\n")

    def initdb(self) -> None:
        self.tool("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        self.configure(listen_addresses="127.0.0.1", port=str(self.port),
                       unix_socket_directories=str(self.root), max_connections="80",
                       shared_buffers="32MB", wal_keep_size="256MB",
                       wal_retrieve_retry_interval="200ms", log_line_prefix="%m [%p] ")

    def basebackup(self, source: Cluster, upstream: Cluster,
                   synchronous_standby_names: str) -> None:
        """A standby: a copy of ``source`` (``pg_basebackup -R``) streaming from
        ``upstream`` under its own name as application_name."""
        self.tool("pg_basebackup", "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres",
                  "-D", str(self.data), "-R", "-X", "stream", "--checkpoint=fast")
        self.configure(port=str(self.port), synchronous_standby_names=synchronous_standby_names,
                       primary_conninfo=f"host=127.0.0.1 port={upstream.port} user=postgres "
                                        f"application_name={self.name}")

    def start(self) -> None:
        self.tool("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                  "start")
        self.processes.add(self.postmaster_pid())

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def kill_postmaster(self) -> None:
        """SIGKILL the postmaster, as when its host dies. Its children notice and exit; they
        are remembered so that ``close`` can make sure of it."""
        postmaster = psutil.Process(self.postmaster_pid())
        self.processes |= {p.pid for p in postmaster.children(recursive=True)}
        postmaster.send_signal(signal.SIGKILL)

    def promote(self) -> None:
        self.tool("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def close(self) -> None:
        """Stop the cluster and every process of it still alive."""
        self.stop("immediate")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            self.processes.add(self.postmaster_pid())
        for pid in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                for child in process.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                process.kill()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-4000:] if self.logfile.exists() else ""


async def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def value(url: str, sql: str, *args: Any) -> Any:
    return (await query(url, sql, *args))[0][0]


async def wait_for(check: Any, what: str, seconds: float = 60.0) -> Any:
    """Poll the coroutine function ``check`` until it returns something truthy."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            last = await check()
            if last:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Rig:
    """Primary ``a``, synchronous standby ``b``, read replica ``c`` (see the module doc)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL 15 server binaries not found in {PG_BIN} "
                               "(Debian package postgresql-15; make test-slow installs it)")
        self.root = Path(tempfile.mkdtemp(prefix="mirror-rig-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        self.a = Cluster(self.root, "a")
        self.b = Cluster(self.root, "b")
        self.c = Cluster(self.root, "c")

    @property
    def database_url(self) -> str:
        """What the mirror is given: both hosts that may be the primary."""
        return (f"postgresql://postgres@{self.a.host},{self.b.host}/mirror"
                "?target_session_attrs=read-write")

    async def build(self) -> Rig:
        a, b, c = self.a, self.b, self.c
        a.initdb()
        a.start()
        b.basebackup(a, a, synchronous_standby_names="c")
        b.start()
        # c is copied from a but streams from b: a cascading standby that follows b.
        c.basebackup(a, b, synchronous_standby_names="")
        c.start()
        # Only now that b streams: from here on every commit on a waits for b's flush.
        await query(a.url("postgres"), "ALTER SYSTEM SET synchronous_standby_names = 'b'")
        await query(a.url("postgres"), "SELECT pg_reload_conf()")
        await wait_for(lambda: value(
            a.url("postgres"), "SELECT count(*) = 1 FROM pg_stat_replication "
            "WHERE application_name = 'b' AND sync_state = 'sync'"), "b to be synchronous")
        await wait_for(lambda: value(
            b.url("postgres"), "SELECT count(*) = 1 FROM pg_stat_replication "
            "WHERE application_name = 'c' AND state = 'streaming'"), "c to stream from b")
        await query(a.url("postgres"), "CREATE DATABASE mirror")
        return self

    async def caught_up(self, replica: Cluster, primary: Cluster) -> None:
        """Until ``replica`` has replayed everything ``primary`` has written so far."""
        target = await value(primary.url("postgres"), "SELECT pg_current_wal_lsn()::text")
        await wait_for(lambda: value(
            replica.url("postgres"),
            "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target),
            f"{replica.name} to replay up to {target}")

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}.log\n{c.log()}" for c in (self.a, self.b, self.c))

    def close(self) -> None:
        for cluster in (self.c, self.b, self.a):
            cluster.close()
        shutil.rmtree(self.root, ignore_errors=True)
