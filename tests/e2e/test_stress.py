"""Projections under stress, against the running service: poison and unknown events never
stall other objects; a long transaction elsewhere delays projection but never loses an event,
and `mirror status` and /metrics show the visibility horizon's age and the lag meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from mirror.db import init_connection
from mirror.eventlog import insert_records
from tests.e2e.harness import Service, wait_projected
from tests.logtools import record
from tests.signing import envelope, signed


def order(object_id: str, minute: int, status: str, **extra: Any) -> dict[str, Any]:
    kind = "order.created" if minute == 0 else "order.updated"
    return envelope(kind, {"id": object_id, "status": status, "order_number": object_id,
                           "updated_date": f"2025-10-01T10:{minute:02d}:00Z", **extra})


async def post_all(service: Service, events: list[dict[str, Any] | str]) -> list[int]:
    async with aiohttp.ClientSession() as session:
        async def post(event: dict[str, Any] | str) -> int:
            body, headers = signed(event)
            async with session.post(f"{service.url}/webhooks", data=body,
                                    headers=headers) as response:
                await response.read()
                return response.status
        return list(await asyncio.gather(*(post(e) for e in events)))


async def metrics(service: Service) -> dict[str, float]:
    """Every sample of /metrics, keyed ``name{label="value",...}``."""
    async with aiohttp.ClientSession() as session, \
            session.get(f"{service.url}/metrics") as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def lag_events(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("mirror_projection_lag_events{"))


def status_report(db_url: str) -> dict[str, Any]:
    """`mirror status --json`, run as a user would."""
    env = {**os.environ, "DATABASE_URL": db_url, "MIRROR_LOG_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-m", "mirror", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


async def test_poison_and_unknown_events_never_stall_other_objects(
        start_service: Callable[..., Service], db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        # An object the database refuses (a constraint a user added): its fold is poison.
        await conn.execute(
            "ALTER TABLE mirror.orders ADD CONSTRAINT no_poison CHECK (status <> 'poison')")
        service = start_service()
        # Ids that share the poisoned object's partition (the same hash as mirror.events.part),
        # beside ids spread over the others.
        same_part = [r["id"] for r in await conn.fetch(
            "SELECT 'ord_n' || g AS id FROM generate_series(0, 20000) g "
            "WHERE (hashtext('order/conn_1/ord_n' || g) & 2147483647) % 128 = "
            "(hashtext('order/conn_1/ord_poison') & 2147483647) % 128 LIMIT 4")]
        ids = [f"ord_{n}" for n in range(44)] + same_part
        events: list[dict[str, Any] | str] = []
        for oid in ids:
            events += [order(oid, 0, "open"), order(oid, 5, "picked")]
        events += [order("ord_poison", 0, "poison"), order("ord_poison", 5, "poison")]
        events += [envelope("inventory_ledger.created", {"id": f"l{n}"}) for n in range(5)]
        events += [envelope("install.failed", {"reason": "x"}), '{"event_type": oops',
                   envelope("order.updated", {"id": "ord_t"}, data_truncated=True)]
        assert set(await post_all(service, events)) == {200}
        # Later events still flow through every partition, the poisoned one's included.
        assert set(await post_all(service, [order(oid, 9, "packed") for oid in ids])) == {200}
        await wait_projected(db_url)
        statuses = dict(await conn.fetch("SELECT id, status FROM mirror.orders"))
        assert statuses == {oid: "packed" for oid in ids}
        poison_part = await conn.fetchval(
            "SELECT part FROM mirror.events WHERE object_id = 'ord_poison' LIMIT 1")
        neighbours = await conn.fetchval(
            "SELECT count(DISTINCT object_id) FROM mirror.events WHERE part = $1 "
            "AND object_id LIKE 'ord\\_%' AND object_id <> 'ord_poison'", poison_part)
        assert neighbours > 0  # objects sharing the poisoned partition were projected too
        assert [r["object_id"] for r in await conn.fetch("SELECT object_id FROM mirror.poison")
                ] == ["ord_poison"]
        report = status_report(db_url)
        assert report["projection_lag_events"] == 0
        assert report["unknown_event_types"] == {"inventory_ledger.created": 5,
                                                 "install.failed": 1}
        assert report["unprojectable"] == 8
        assert [p["object_id"] for p in report["poisoned_objects"]] == ["ord_poison"]
        samples = await metrics(service)
        assert samples["mirror_poisoned_objects"] == 1
        assert samples["mirror_unprojectable_events"] == 8
        assert lag_events(samples) == 0
    finally:
        await conn.close()


async def _wait_for(condition: Callable[[], Any], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_long_transaction_delays_projection_but_loses_nothing_and_shows(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    conn = await asyncpg.connect(db_url)
    long = await asyncpg.connect(db_url)
    await init_connection(long)
    try:
        # A transaction that took an xid and stays open, and that also appends an event: it
        # has the lowest position but will commit last.
        tx = long.transaction()
        await tx.start()
        await long.fetchval("SELECT pg_current_xact_id()")
        await insert_records(long, [record(order("ord_late", 0, "open"))])
        assert set(await post_all(service, [order(f"ord_{n}", 0, "open")
                                            for n in range(40)])) == {200}

        async def horizon_shown() -> bool:
            return (await metrics(service))["mirror_visibility_horizon_seconds"] >= 1.0

        await _wait_for(horizon_shown, "the horizon's age in /metrics")
        held = (await metrics(service))["mirror_visibility_horizon_seconds"]
        # Stored, acknowledged, and held back: nothing after the open xid is projected yet.
        assert await conn.fetchval("SELECT count(*) FROM mirror.events") == 40
        assert await conn.fetchval("SELECT count(*) FROM mirror.orders") == 0
        samples = await metrics(service)
        assert lag_events(samples) == 40
        assert samples["mirror_projection_lag_seconds"] > 0
        report = status_report(db_url)
        assert report["visibility_horizon_seconds"] >= 1.0
        assert report["projection_lag_events"] == 40
        assert report["projection_lag_seconds"] > 0
        async with aiohttp.ClientSession() as session, \
                session.get(f"{service.url}/readyz") as response:
            assert (await response.json())["lag"]["events"] == 40

        await tx.commit()  # the late commit lands, below everything else's position
        await wait_projected(db_url)
        ids = {r["id"] for r in await conn.fetch("SELECT id FROM mirror.orders")}
        assert ids == {f"ord_{n}" for n in range(40)} | {"ord_late"}
        assert await conn.fetchval("SELECT count(*) FROM mirror.versions") == 41
        late, first = await conn.fetchval(
            "SELECT array[(SELECT position FROM mirror.events WHERE object_id = 'ord_late'),"
            " (SELECT min(position) FROM mirror.events WHERE object_id <> 'ord_late')]")
        assert late < first  # it did commit out of order, and was not skipped
        samples = await metrics(service)
        assert lag_events(samples) == 0 and samples["mirror_projection_lag_seconds"] == 0
        assert samples["mirror_visibility_horizon_seconds"] < held
    finally:
        await long.close()
        await conn.close()


async def test_visibility_horizon_counts_only_transactions_that_hold_projection_back(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = start_service()
    reader = await asyncpg.connect(db_url)
    try:
        tx = reader.transaction(isolation="repeatable_read", readonly=True)
        await tx.start()
        await reader.fetchval("SELECT count(*) FROM mirror.events")  # holds a snapshot
        await asyncio.sleep(1.5)
        assert set(await post_all(service, [order("ord_1", 0, "open")])) == {200}
        await wait_projected(db_url)  # this reader does not hold projection back...
        samples = await metrics(service)
        # ... so the horizon that "holds back projection" must not be its age.
        assert samples["mirror_visibility_horizon_seconds"] < 1.0
        await tx.rollback()
    finally:
        await reader.close()
