"""Property: any delivery order, any duplication and any batching of the same events give the
same relations (README, "How time and order work": history is a function of the set of events)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.db import init_connection
from mirror.eventlog import Record, insert_records
from mirror.paths import diff
from mirror.rebuild import rebuild
from tests.conftest import with_database
from tests.logtools import project_all, record, snapshot
from tests.signing import envelope, iso

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
_counter = iter(range(1_000_000))


@st.composite
def event_sets(draw: st.DrawFn) -> list[Record]:
    records = []
    for n in range(draw(st.integers(1, 3))):
        state: dict[str, Any] = {"id": f"ord_{n}", "status": "open", "tags": [],
                                 "line_items": [{"sku": "A", "quantity": 1}],
                                 "created_date": iso(T0), "updated_date": iso(T0)}
        states = [state]
        minute = 0
        for _ in range(draw(st.integers(0, 5))):
            minute += draw(st.integers(1, 30))
            new = {**states[-1], "updated_date": iso(T0 + timedelta(minutes=minute))}
            new["status"] = draw(st.sampled_from(["open", "picked", "packed", "shipped"]))
            new["line_items"] = [{"sku": "A", "quantity": draw(st.integers(1, 4))}] * \
                draw(st.integers(1, 3))
            new["tags"] = draw(st.lists(st.sampled_from(["x", "y"]), max_size=2))
            states.append(new)
        for index, current in enumerate(states):
            if index and draw(st.booleans()) and draw(st.booleans()):
                continue  # this webhook never arrives: a later one may reveal it
            previous = diff(states[index - 1], current) if index else None
            kind = "order.updated" if index else "order.created"
            received = T0 + timedelta(hours=1, seconds=next(_counter))
            records.append(record(envelope(kind, current, previous=previous),
                                  received_at=received))
    return records


async def _deliver(server_url: str, template: str, deliveries: list[Record],
                   batches: list[int]) -> dict[str, Any]:
    name = f"mirror_prop_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        conn = await asyncpg.connect(with_database(server_url, name))
        await init_connection(conn)
        start = 0
        for size in [*batches, len(deliveries)]:
            chunk = deliveries[start : start + size]
            start += size
            if chunk:
                await insert_records(conn, chunk)
                await project_all(conn, batch_size=3)
        result = await snapshot(conn)
        # Live projection appends onto stored tails where it can; a full re-fold of every
        # object from the log must give exactly the same rows.
        await rebuild(conn)
        assert await snapshot(conn) == result
        await conn.close()
        return result
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=event_sets(), data=st.data())
def test_any_order_duplication_and_batching_give_the_same_relations(
        server_url: str, template_db: str, events: list[Record], data: st.DataObject) -> None:
    orders = []
    for _ in range(2):
        shuffled = data.draw(st.permutations(events))
        dupes = data.draw(st.lists(st.sampled_from(events), max_size=4))
        mixed = data.draw(st.permutations([*shuffled, *dupes]))
        batches = data.draw(st.lists(st.integers(1, 4), max_size=4))
        orders.append((list(mixed), batches))
    first = asyncio.run(_deliver(server_url, template_db, *orders[0]))
    second = asyncio.run(_deliver(server_url, template_db, *orders[1]))
    assert first == second
    assert len(first["orders"]) == len({r.parsed.object_id for r in events})
