"""Crashes: the service SIGKILLed under load, and its projection workers SIGKILLed mid-work.

Promise: an event answered 2xx is in the log exactly once, whatever happens to the process
afterwards; re-posting what was not acknowledged (as Svix does) completes the set; and the
projections built across a crash equal a rebuild from the log (nothing lost, nothing applied
twice).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from mirror.db import init_connection
from mirror.rebuild import rebuild
from mirror.sample import message_id
from tests.e2e.harness import Service, fetch, wait_projected
from tests.logtools import append, record, snapshot
from tests.signing import envelope, iso, signed

pytestmark = pytest.mark.slow

CLIENTS = 32
T0 = datetime(2025, 7, 1, 8, 0, tzinfo=UTC)


def order_version(object_id: str, version: int) -> dict[str, Any]:
    """Version ``version`` of an order: created at 0, then one update a minute."""
    data = {"id": object_id, "order_number": object_id, "status": f"s{version}",
            "created_date": iso(T0), "updated_date": iso(T0 + timedelta(minutes=version)),
            "line_items": [{"sku": "A", "quantity": version + 1}]}
    if version == 0:
        return envelope("order.created", data)
    previous = {"status": f"s{version - 1}", "updated_date": iso(T0 + timedelta(minutes=version - 1)),
                "line_items.0.quantity": version}
    return envelope("order.updated", data, previous=previous)


@dataclass
class Delivery:
    """One event as Svix would deliver it: a fixed id and body, re-signed on every attempt."""

    event_id: str
    event: dict[str, Any]
    attempts: list[str] = field(default_factory=list)   # outcome of each attempt

    def request(self) -> tuple[bytes, dict[str, str]]:
        return signed(self.event, msg_id=self.event_id)

    @property
    def acknowledged(self) -> bool:
        return any(a.startswith("2") for a in self.attempts)


async def post(session: aiohttp.ClientSession, base: str, delivery: Delivery) -> str:
    """One attempt; its outcome: the status code, or the name of the error."""
    body, headers = delivery.request()
    try:
        async with session.post(f"{base}/webhooks", data=body, headers=headers) as response:
            await response.read()
            outcome = str(response.status)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        outcome = type(exc).__name__
    delivery.attempts.append(outcome)
    return outcome


async def test_sigkill_under_load_loses_no_acknowledged_event(
        start_service: Callable[..., Service], db_url: str) -> None:
    objects, versions = 160, 4
    deliveries = [Delivery(message_id(), order_version(f"ord_{n}", v))
                  for v in range(versions) for n in range(objects)]
    service = start_service()
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    for delivery in deliveries:
        queue.put_nowait(delivery)
    killed = asyncio.Event()
    acked_at_kill: list[int] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty() and not killed.is_set():
            await post(session, service.url, queue.get_nowait())

    async def killer() -> None:
        # Kill once a third is acknowledged, with all 32 clients mid-request.
        deadline = time.monotonic() + 60
        while sum(d.acknowledged for d in deliveries) < len(deliveries) // 3:
            assert time.monotonic() < deadline, "load never got going"
            await asyncio.sleep(0.005)
        service.kill()
        acked_at_kill.append(sum(d.acknowledged for d in deliveries))
        killed.set()

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(killer(), *(client(session) for _ in range(CLIENTS)))
    assert not service.running

    acknowledged = {d.event_id for d in deliveries if d.acknowledged}
    interrupted = [d for d in deliveries if d.attempts and not d.acknowledged]
    rows = await fetch(db_url, "SELECT event_id, count(*) AS n FROM mirror.events GROUP BY 1")
    stored = {r["event_id"]: r["n"] for r in rows}
    assert acknowledged <= set(stored), "an acknowledged event is missing after SIGKILL"
    assert set(stored.values()) == {1}
    assert interrupted, "the kill did not interrupt any request: it tested nothing"

    # Restart; Svix retries everything that was not acknowledged, re-signed, same ids.
    service.start()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        retry = [d for d in deliveries if not d.acknowledged]
        outcomes = await asyncio.gather(*(post(session, service.url, d) for d in retry))
    assert set(outcomes) == {"200"}
    rows = await fetch(db_url, "SELECT event_id FROM mirror.events")
    assert sorted(r["event_id"] for r in rows) == sorted(d.event_id for d in deliveries)

    # And the projection, fed across the crash, holds every version exactly once.
    await wait_projected(db_url)
    per_object = await fetch(db_url, "SELECT object_id, count(*) AS n FROM mirror.versions "
                                     "WHERE NOT derived GROUP BY 1")
    assert {r["object_id"]: r["n"] for r in per_object} == \
        {f"ord_{n}": versions for n in range(objects)}
    statuses = await fetch(db_url, "SELECT DISTINCT status FROM mirror.orders")
    assert [r["status"] for r in statuses] == [f"s{versions - 1}"]
    stored_unacked = len(set(stored) - acknowledged)
    print(f"\ncrash: {len(deliveries)} events; {acked_at_kill[0]} acknowledged when the "
          f"kill landed, {len(acknowledged)} once answers already on the wire were read; "
          f"{len(interrupted)} requests interrupted, {stored_unacked} of them committed anyway "
          f"(answer lost); {len(retry)} re-posted after restart, all stored exactly once")


async def test_projection_workers_sigkilled_mid_work_resume_exactly(
        start_service: Callable[..., Service], db_url: str) -> None:
    objects, versions = 300, 8
    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    try:
        events = [record(order_version(f"ord_{n}", v)) for v in range(versions)
                  for n in range(objects)]
        await append(conn, *events)
        total = len(events)
        service = start_service(env={"MIRROR_BATCH_SIZE": "10", "MIRROR_WORKERS": "2"})
        deadline = time.monotonic() + 60
        while True:
            projected = await conn.fetchval(
                "SELECT count(*) FROM mirror.checkpoints c JOIN mirror.events e "
                "ON e.part = c.part AND (e.txid, e.position) <= (c.last_txid, c.last_position)")
            if projected >= total // 4:
                break
            assert time.monotonic() < deadline, "projection never got going"
            await asyncio.sleep(0.01)
        service.kill()
        projected = await conn.fetchval(
            "SELECT count(*) FROM mirror.checkpoints c JOIN mirror.events e "
            "ON e.part = c.part AND (e.txid, e.position) <= (c.last_txid, c.last_position)")
        assert 0 < projected < total, "the kill did not land mid-work"

        service.start()
        await wait_projected(db_url)
        per_object = await conn.fetch("SELECT object_id, count(*) AS n FROM mirror.versions "
                                      "WHERE NOT derived GROUP BY 1")
        assert {r["object_id"]: r["n"] for r in per_object} == \
            {f"ord_{n}": versions for n in range(objects)}
        assert await conn.fetchval("SELECT count(*) FROM mirror.changes WHERE path = 'status'"
                                   ) == objects * (versions - 1)
        service.stop()
        live = await snapshot(conn)
        await rebuild(conn)
        assert await snapshot(conn) == live
        print(f"\nprojector crash: killed with {projected} of {total} events projected; "
              f"after restart every object has its {versions} versions once; rebuild == live")
    finally:
        await conn.close()
