"""Partition leases: a fair share for every live worker, handed over when one joins or dies."""

from __future__ import annotations

import asyncpg

from mirror import progress
from mirror.status import gather


async def test_workers_share_the_partitions_and_take_over_a_dead_ones(
        conn: asyncpg.Connection) -> None:
    assert len(await progress.keep_leases(conn, "host-a:1:0")) == progress.PARTITIONS == 128
    # A second worker arrives: nothing is free yet, the first gives up half on its next round.
    assert await progress.keep_leases(conn, "host-b:2:0") == []
    a = await progress.keep_leases(conn, "host-a:1:0")
    b = await progress.keep_leases(conn, "host-b:2:0")
    assert len(a) == len(b) == 64 and not set(a) & set(b)
    report = await gather(conn)
    assert report["partitions"] == 128
    assert {w["owner"]: w["partitions"] for w in report["leases"]} == \
        {"host-a:1:0": 64, "host-b:2:0": 64}
    # host-a dies: no heartbeat, its leases run out. host-b takes everything over.
    await conn.execute("UPDATE mirror.workers SET beat_at = now() - interval '1 minute' "
                       "WHERE name = 'host-a:1:0'")
    await conn.execute("UPDATE mirror.checkpoints SET lease_until = now() - interval '1 s' "
                       "WHERE owner = 'host-a:1:0'")
    assert len(await progress.keep_leases(conn, "host-b:2:0")) == 128
    # A clean stop hands everything back at once.
    await progress.release_leases(conn, "host-b:2:0")
    assert await conn.fetchval("SELECT count(*) FROM mirror.checkpoints "
                               "WHERE owner IS NOT NULL") == 0


async def test_a_worker_whose_lease_was_taken_over_cannot_advance_the_partition(
        conn: asyncpg.Connection) -> None:
    from mirror.projector import project_page
    from tests.logtools import append
    from tests.signing import envelope

    await append(conn, envelope("product.created", {"id": "p1", "sku": "S",
                                                    "updated_date": "2025-01-01T00:00:00Z"}))
    held = await progress.keep_leases(conn, "old:1:0")
    await conn.execute("UPDATE mirror.checkpoints SET owner = 'new:2:0'")  # taken over
    assert await project_page(conn, held, owner="old:1:0") == 0
    assert await conn.fetchval("SELECT count(*) FROM mirror.products") == 0
    assert await project_page(conn, held, owner="new:2:0") == 1
    assert await conn.fetchval("SELECT count(*) FROM mirror.products") == 1


async def test_expired_leases_are_taken_over_before_the_heartbeat_ages_out(
        conn: asyncpg.Connection) -> None:
    await progress.keep_leases(conn, "host-a:1:0")
    await progress.keep_leases(conn, "host-b:2:0")
    await progress.keep_leases(conn, "host-a:1:0")
    assert len(await progress.keep_leases(conn, "host-b:2:0")) == 64
    # host-a was SIGKILLed a moment ago: its leases ran out, its heartbeat still looks fresh.
    await conn.execute("UPDATE mirror.checkpoints SET lease_until = now() - interval '1 s' "
                       "WHERE owner = 'host-a:1:0'")
    assert len(await progress.keep_leases(conn, "host-b:2:0")) == 128
