"""Where projection stands: partition leases, lag, the visibility horizon, live workers.

The SQL that decides "is this event still to be folded" is written once, as the view
``mirror.unprojected_events`` in schema.sql; everything here builds on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg

from mirror.metrics import Metrics

PARTITIONS = 128
LEASE_SECONDS = 10      # a worker that stops renewing loses its partitions after this long
RENEW_SECONDS = 2.0     # how often a worker renews, gives up extras and claims its share
WORKERS_FRESH = "15 seconds"

BEAT_SQL = """
INSERT INTO mirror.workers (name) VALUES ($1)
ON CONFLICT (name) DO UPDATE SET beat_at = now()
"""
LIVE_WORKERS_SQL = f"""
SELECT count(*) FROM mirror.workers WHERE beat_at > now() - interval '{WORKERS_FRESH}'
"""
RENEW_SQL = f"""
UPDATE mirror.checkpoints SET lease_until = now() + interval '{LEASE_SECONDS} seconds'
WHERE owner = $1
RETURNING part
"""
RELEASE_SQL = """
UPDATE mirror.checkpoints SET owner = NULL, lease_until = NULL
WHERE owner = $1 AND ($2::smallint[] IS NULL OR part = ANY($2::smallint[]))
"""
# Free partitions, or partitions whose owner stopped renewing. SKIP LOCKED: a partition in
# the middle of a page is its owner's until that page commits.
CLAIM_SQL = f"""
UPDATE mirror.checkpoints c
SET owner = $1, lease_until = now() + interval '{LEASE_SECONDS} seconds'
WHERE c.part IN (
    SELECT part FROM mirror.checkpoints
    WHERE owner IS NULL OR lease_until < now()
    ORDER BY part
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
RETURNING part
"""
CLAIM_EXPIRED_SQL = f"""
UPDATE mirror.checkpoints c
SET owner = $1, lease_until = now() + interval '{LEASE_SECONDS} seconds'
WHERE c.part IN (
    SELECT part FROM mirror.checkpoints
    WHERE owner IS NOT NULL AND owner <> $1 AND lease_until < now()
    ORDER BY part
    FOR UPDATE SKIP LOCKED)
RETURNING part
"""
# Heartbeats of workers gone for an hour (SIGKILLed ones never say goodbye).
FORGET_SQL = "DELETE FROM mirror.workers WHERE beat_at < now() - interval '1 hour'"
# Which live worker holds which partitions (`mirror status`; the view mirror.partition_owners
# has one row per partition).
LEASES_SQL = """
SELECT owner, count(*) AS partitions, min(part) AS first, max(part) AS last,
       min(lease_until) AS until
FROM mirror.checkpoints WHERE owner IS NOT NULL AND lease_until > now()
GROUP BY owner ORDER BY owner
"""
LAG_SQL = """
SELECT count(*) AS pending, min(received_at) AS oldest FROM mirror.unprojected_events
"""
BEHIND_SQL = """
SELECT EXISTS (SELECT 1 FROM mirror.unprojected_events WHERE txid < $1::xid8)
"""
# Only transactions holding an xid (running or prepared) hold pg_snapshot_xmin back, and so
# projection; a read-only snapshot (pg_dump, REPEATABLE READ readers) does not.
HORIZON_SQL = """
SELECT coalesce(extract(epoch FROM now() - least(
    (SELECT min(xact_start) FROM pg_stat_activity WHERE backend_xid IS NOT NULL),
    (SELECT min(prepared) FROM pg_prepared_xacts))), 0)::float8
"""


async def keep_leases(conn: asyncpg.Connection, name: str) -> list[int]:
    """Heartbeat, renew this worker's leases, give up what is over its fair share and claim
    what is under it. Returns the partitions it holds now."""
    async with conn.transaction():
        await conn.execute(BEAT_SQL, name)
        live = max(int(await conn.fetchval(LIVE_WORKERS_SQL)), 1)
        share = -(-PARTITIONS // live)
        held = sorted(r["part"] for r in await conn.fetch(RENEW_SQL, name))
        if len(held) > share:
            extra = held[share:]
            await conn.execute(RELEASE_SQL, name, extra)
            held = held[:share]
        # Up to the fair share; and whatever lease has run out even beyond it: a dead worker's
        # partitions are taken over as soon as its leases expire, not only once its heartbeat
        # is old enough to change the share (the next rounds hand the extra back).
        want = max(share - len(held), 0)
        held += [r["part"] for r in await conn.fetch(CLAIM_SQL, name, want)]
        held += [r["part"] for r in await conn.fetch(CLAIM_EXPIRED_SQL, name)]
        await conn.execute(FORGET_SQL)
    return sorted(held)


async def release_leases(conn: asyncpg.Connection, name: str) -> None:
    """Give up every lease and the heartbeat (a clean stop): others take over at once."""
    await conn.execute(RELEASE_SQL, name, None)
    await conn.execute("DELETE FROM mirror.workers WHERE name = $1", name)


async def leases(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Which worker (host:pid:worker) holds how many partitions."""
    return [dict(r) for r in await conn.fetch(LEASES_SQL)]


async def live_workers(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(LIVE_WORKERS_SQL))


async def projection_lag(conn: asyncpg.Connection) -> dict[str, Any]:
    """Events not yet projected and the age of the oldest one."""
    row = await conn.fetchrow(LAG_SQL)
    age = await conn.fetchval("SELECT extract(epoch FROM now() - $1::timestamptz)::float8",
                              row["oldest"]) if row["oldest"] else 0.0
    return {"events": row["pending"], "seconds": round(age or 0.0, 3)}


async def horizon_seconds(conn: asyncpg.Connection) -> float:
    """Age of the oldest transaction holding an xid: it holds every projector back."""
    return float(await conn.fetchval(HORIZON_SQL) or 0.0)


async def wait_caught_up(conn: asyncpg.Connection, timeout: float,
                         wake: Callable[[], None] | None = None) -> None:
    """Return once every event committed before the call has been projected."""
    target = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())")
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if not await conn.fetchval(BEHIND_SQL, target):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("projection not caught up")
        if wake is not None:
            wake()
        await asyncio.sleep(0.02)


async def refresh_gauges(conn: asyncpg.Connection, metrics: Metrics) -> None:
    """Set the log/projection gauges from the database."""
    pending = {r["part"]: r["n"] for r in await conn.fetch(
        "SELECT part, count(*) AS n FROM mirror.unprojected_events GROUP BY part")}
    for part in range(PARTITIONS):
        metrics.lag_events.labels(str(part)).set(pending.get(part, 0))
    metrics.lag_seconds.set((await projection_lag(conn))["seconds"])
    metrics.horizon_seconds.set(await horizon_seconds(conn))
    metrics.log_head.set(await conn.fetchval(
        "SELECT coalesce(max(position), 0) FROM mirror.events"))
    metrics.anomalies.set(await conn.fetchval(
        "SELECT count(*) FROM mirror.anomalies WHERE resolved_at IS NULL"))
    metrics.unprojectable.set(await conn.fetchval(
        "SELECT count(*) FROM mirror.events WHERE unusable_reason IS NOT NULL"))
    metrics.poisoned.set(await conn.fetchval("SELECT count(*) FROM mirror.poison"))
