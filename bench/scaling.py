"""Projection throughput against the number of `mirror project` processes (CONTRACT §10).

One log of ``BENCH_SCALING_EVENTS`` events (default 100,000; bench.deep's generated stream) is
loaded once, then cloned (``CREATE DATABASE … TEMPLATE``) for each run, so every run folds the
same log from a cold start. A run starts N `mirror project --workers 1` processes and times
them until nothing is left to project: from the start of the processes (what an operator
sees), and from the first page committed (the drain rate itself, without the interpreter's
start). The rates of 2 processes against 1 are the scaling figure.

    python -m bench.scaling            # embedded PostgreSQL, or DATABASE_URL's server
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.deep import _load, _records

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = (1, 2)
PENDING_SQL = "SELECT EXISTS (SELECT 1 FROM mirror.unprojected_events)"
MOVED_SQL = "SELECT EXISTS (SELECT 1 FROM mirror.checkpoints WHERE last_position > 0)"


def _with_db(url: str, name: str) -> str:
    from bench.__main__ import _with_db as with_db

    return with_db(url, name)


async def _admin(admin_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _watch(dsn: str, started: float, timeout: float) -> tuple[float, float]:
    """Seconds from ``started`` to the first committed page and to caught up."""
    conn = await asyncpg.connect(dsn)
    first = None
    try:
        while time.perf_counter() - started < timeout:
            if first is None and await conn.fetchval(MOVED_SQL):
                first = time.perf_counter() - started
            if first is not None and not await conn.fetchval(PENDING_SQL):
                return first, time.perf_counter() - started
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise TimeoutError("projection did not catch up")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu_seconds(postmaster: int | None) -> float | None:
    """CPU of a PostgreSQL server on this machine: the postmaster, its reaped backends
    (cutime/cstime) and its live children. None when the server is elsewhere."""
    if postmaster is None:
        return None
    try:
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = sum(int(v) for v in fields[11:15])
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                child = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(child[1]) == postmaster:
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def _data_directory(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT current_setting('data_directory')"))
    finally:
        await conn.close()


def _postmaster(dsn: str) -> int | None:
    """The server's postmaster pid when it runs on this machine (its postmaster.pid)."""
    try:
        pid_file = Path(asyncio.run(_data_directory(dsn))) / "postmaster.pid"
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError, asyncpg.PostgresError):
        return None


def _machine_busy() -> float:
    """CPU seconds spent by the whole machine, every process of every user (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _drain(dsn: str, processes: int, events: int) -> dict[str, Any]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
           "DATABASE_URL": dsn, "MIRROR_LOG_LEVEL": "WARNING"}
    postmaster = _postmaster(dsn)
    started = time.perf_counter()
    busy = _machine_busy()
    server = _server_cpu_seconds(postmaster)
    procs = [subprocess.Popen([sys.executable, "-m", "mirror", "project", "--workers", "1"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(processes)]
    try:
        first, total = asyncio.run(_watch(dsn, started, 1800))
        cpu = sum(_cpu_seconds(p.pid) for p in procs)
        busy = _machine_busy() - busy
        after = _server_cpu_seconds(postmaster)
        database = None if server is None or after is None else round(after - server, 1)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    return {"processes": processes, "events": events, "seconds": round(total, 2),
            "events_per_s": round(events / total, 1),
            "drain_seconds": round(total - first, 2),
            "drain_events_per_s": round(events / (total - first), 1),
            # Where the CPU went: the projection processes, and the whole machine (the
            # database and whatever else runs on it) against the cores' capacity.
            "projector_cpu_s": round(cpu, 1), "database_cpu_s": database,
            "machine_busy": round(busy / (total * (os.cpu_count() or 1)), 2),
            # How many cores the mirror (projection + database) actually got, and its work
            # per CPU-second: equal per-CPU figures mean sharing the work costs nothing extra,
            # and the rate follows the cores it is given.
            "mirror_cores": None if database is None else round((cpu + database) / total, 2),
            "events_per_cpu_s": None if database is None
            else round(events / (cpu + database), 1)}


def run(admin_url: str, events: int | None = None) -> dict[str, Any]:
    """Load the log once; fold it cold with 1, then 2 processes. Figures per run and ratios."""
    events = events or int(os.environ.get("BENCH_SCALING_EVENTS", "100000"))
    source = "bench_scaling_src"
    asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{source}" WITH (FORCE)',
                       f'CREATE DATABASE "{source}"'))
    started = time.perf_counter()
    records = _records(events)
    asyncio.run(_load(_with_db(admin_url, source), records))
    print(f"  scaling: loaded {len(records)} events in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    runs = []
    for n in PROCESSES:
        name = f"bench_scaling_{n}"
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                           f'CREATE DATABASE "{name}" TEMPLATE "{source}"'))
        result = _drain(_with_db(admin_url, name), n, len(records))
        print(f"  scaling: {n} process(es): {result['events_per_s']} events/s from start, "
              f"{result['drain_events_per_s']} events/s draining, projector CPU "
              f"{result['projector_cpu_s']} s, database CPU {result['database_cpu_s']} s, "
              f"machine busy {result['machine_busy']:.0%}",
              file=sys.stderr)
        runs.append(result)
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{source}" WITH (FORCE)'))
    one, two = runs[0], runs[1]
    return {"events": len(records), "cores": os.cpu_count(), "runs": runs,
            "ratio": round(two["events_per_s"] / one["events_per_s"], 2),
            "drain_ratio": round(two["drain_events_per_s"] / one["drain_events_per_s"], 2)}


def render(r: dict[str, Any]) -> list[str]:
    """Markdown table rows (| figure | mirror | baseline | ratio | target |)."""
    one, two = r["runs"][0], r["runs"][1]
    return [
        f"| projection, 2 `mirror project` processes vs 1, cold fold of {r['events']} events "
        f"(from start) | {two['events_per_s']} events/s ({two['seconds']} s) | 1 process "
        f"{one['events_per_s']} events/s ({one['seconds']} s) | {r['ratio']:.2f}x | ≥ 1.6x |",
        f"| the same, drain rate after the first page | {two['drain_events_per_s']} events/s "
        f"| 1 process {one['drain_events_per_s']} events/s | {r['drain_ratio']:.2f}x | ≥ 1.6x |",
        f"| the same, CPU: projection / database / machine busy | "
        f"{two['projector_cpu_s']} s / {two['database_cpu_s']} s / "
        f"{two['machine_busy']:.0%} of {r['cores']} cores | 1 process "
        f"{one['projector_cpu_s']} s / {one['database_cpu_s']} s / {one['machine_busy']:.0%} "
        "| | |",
        f"| the same, cores the mirror got; events per CPU-second | {two['mirror_cores']}; "
        f"{two['events_per_cpu_s']} | 1 process {one['mirror_cores']}; "
        f"{one['events_per_cpu_s']} | | |",
    ]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mirror-bench-scaling-") as tmp:
        admin = os.environ.get("DATABASE_URL", "").strip()
        server = None
        if not admin:
            from mirror import embedded

            server, url = embedded.start(Path(tmp) / "pg")
            admin = _with_db(url, "postgres")
        try:
            result = run(admin)
        finally:
            if server is not None:
                server.cleanup()
    print("| figure | mirror | baseline | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
