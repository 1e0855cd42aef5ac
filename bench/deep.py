"""The database-heavy figures: cold projection over pre-loaded logs (100,000 events in order and
shuffled within windows of 200, and a large log to show the rate stays flat), a full rebuild,
object_as_of at 1 / 100 / 10,000 versions with and without known_at, and table_as_of over the
largest resource."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.load import percentile
from bench.workload import T0, generate
from mirror import parsing
from mirror.db import init_connection, migrate
from mirror.eventlog import Record, insert_records
from mirror.progress import PARTITIONS
from mirror.projector import project_page
from mirror.rebuild import rebuild

ROOT = Path(__file__).resolve().parent.parent
BEHIND_SQL = "SELECT count(*) FROM (SELECT 1 FROM mirror.unprojected_events LIMIT 1) x"


def _records(total: int, window: int = 0, seed: int = 5) -> list[Record]:
    """``total`` log records: a generated stream replayed for several connections; with
    ``window``, shuffled within consecutive windows of that many records (late events)."""
    records = _stream(total)
    if window:
        rng = random.Random(seed)
        for start in range(0, len(records), window):
            chunk = records[start : start + window]
            rng.shuffle(chunk)
            records[start : start + window] = chunk
    return records


def _stream(total: int) -> list[Record]:
    copies = 5
    base = generate(total // copies + 1, seed=5, updates_per_object=3)
    out: list[Record] = []
    received = T0 + timedelta(days=2)
    for k in range(copies):
        for d in base:
            body = d.body.replace('"conn_bench"', f'"conn_bench_{k}"')
            msg = d.msg_id[:-2] + f"{k:02d}"
            out.append(Record(msg, received, received, "webhook",
                              parsing.parse(body.encode())))
            if len(out) == total:
                return out
    return out


async def _load(dsn: str, records: list[Record]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        await migrate(conn)
        for start in range(0, len(records), 5000):
            await insert_records(conn, records[start : start + 5000])
    finally:
        await conn.close()


async def _wait_caught_up(dsn: str, timeout: float) -> float:
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < timeout:
            if await conn.fetchval(BEHIND_SQL) == 0:
                return time.perf_counter() - started
            await asyncio.sleep(0.25)
    finally:
        await conn.close()
    raise TimeoutError("projector did not catch up")


def _projector(dsn: str, events: int, processes: int = 2) -> dict[str, Any]:
    env = {**os.environ, "DATABASE_URL": dsn, "MIRROR_LOG_LEVEL": "WARNING"}
    procs = [subprocess.Popen([sys.executable, "-m", "mirror", "project", "--workers", "1"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(processes)]
    try:
        seconds = asyncio.run(_wait_caught_up(dsn, 1800))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    return {"events": events, "seconds": round(seconds, 1), "processes": processes,
            "events_per_s": round(events / seconds, 1)}


async def _rebuild(dsn: str) -> dict[str, Any]:
    """`mirror rebuild` of every resource in one transaction: log events re-folded per s."""
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        events = await conn.fetchval("SELECT count(*) FROM mirror.events "
                                     "WHERE unusable_reason IS NULL")
        started = time.perf_counter()
        await rebuild(conn)
        seconds = time.perf_counter() - started
        return {"resource": "all", "events": events, "seconds": round(seconds, 1),
                "events_per_s": round(events / seconds, 1)}
    finally:
        await conn.close()


async def _as_of(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    rng = random.Random(3)
    try:
        for depth in (1, 100, 10_000):
            records = []
            for v in range(depth):
                at = T0 + timedelta(minutes=v)
                data = {"id": f"deep_{depth}", "sku": "D", "onhand": v,
                        "updated_date": at.isoformat().replace("+00:00", "Z")}
                body = orjson.dumps({"connection_id": "conn_deep", "event_type":
                                     "inventory.updated", "data": data})
                records.append(Record(f"msg_deep_{depth}_{v}", at, at, "webhook",
                                      parsing.parse(body)))
            for start in range(0, len(records), 5000):
                await insert_records(conn, records[start : start + 5000])
        while True:
            done = await project_page(conn, list(range(PARTITIONS)), page_size=20_000)
            if done == 0:
                break
        await conn.execute("ANALYZE mirror.states")
        statement = await conn.prepare(
            "SELECT mirror.object_as_of('inventory', $1, $2, NULL, $3)")
        out: dict[str, Any] = {}
        for depth in (1, 100, 10_000):
            for known in (False, True):
                timings = []
                for _ in range(2000):
                    at = T0 + timedelta(minutes=rng.uniform(0, depth))
                    known_at = at + timedelta(minutes=rng.uniform(0, 5)) if known else None
                    started = time.perf_counter()
                    await statement.fetchval(f"deep_{depth}", at, known_at)
                    timings.append(time.perf_counter() - started)
                key = f"{depth}_known_at" if known else str(depth)
                out[key] = {"p50_ms": round(percentile(timings, 0.5) * 1000, 3),
                            "p99_ms": round(percentile(timings, 0.99) * 1000, 3)}
        return out
    finally:
        await conn.close()


async def _table_as_of(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        resource, objects = await conn.fetchrow(
            "SELECT resource, count(*) FROM mirror.objects WHERE connection_id LIKE "
            "'conn_bench%' GROUP BY 1 ORDER BY 2 DESC LIMIT 1")
        at = T0 + timedelta(hours=20)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            rows = await conn.fetchval(
                "SELECT count(*) FROM mirror.table_as_of($1, $2)", resource, at)
            timings.append(time.perf_counter() - started)
        fetched = []
        for _ in range(3):  # every row's data too, as a client would read them
            started = time.perf_counter()
            await conn.fetch("SELECT * FROM mirror.table_as_of($1, $2)", resource, at)
            fetched.append(time.perf_counter() - started)
        return {"resource": resource, "objects": objects, "rows_at_t": rows,
                "ms": round(sorted(timings)[1] * 1000, 1),
                "fetch_ms": round(sorted(fetched)[1] * 1000, 1)}
    finally:
        await conn.close()


def _cold(admin_url: str, name: str, events: int, window: int) -> tuple[str, dict[str, Any]]:
    from bench.__main__ import _fresh_db

    dsn = asyncio.run(_fresh_db(admin_url, name))
    started = time.perf_counter()
    records = _records(events, window)
    asyncio.run(_load(dsn, records))
    print(f"  loaded {len(records)} events in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    result = _projector(dsn, len(records))
    result["shuffled_within"] = window
    print(f"  cold projection of {len(records)} (window {window}): "
          f"{result['events_per_s']} events/s", file=sys.stderr)
    return dsn, result


def run(admin_url: str, events: int) -> dict[str, Any]:
    """Every deep figure, each on a fresh database."""
    small = min(100_000, events)
    cold: dict[str, Any] = {}
    dsn, cold["small"] = _cold(admin_url, "bench_cold_small", small, 0)
    rebuilt = asyncio.run(_rebuild(dsn))
    print(f"  rebuild: {rebuilt['events_per_s']} events/s", file=sys.stderr)
    _, cold["small_shuffled"] = _cold(admin_url, "bench_cold_shuffled", small, 200)
    dsn, cold["large"] = _cold(admin_url, "bench_cold_large", events, 0)
    return {"projector": cold, "rebuild": rebuilt,
            "table_as_of": asyncio.run(_table_as_of(dsn)), "as_of": asyncio.run(_as_of(dsn))}
