"""Projections against a real PostgreSQL: current state, versions, changes, the rules of the README's "How time and order work"."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from mirror.db import init_connection
from mirror.eventlog import insert_records
from mirror.keys import SETTINGS
from mirror.progress import PARTITIONS
from mirror.projector import project_page
from mirror.rebuild import rebuild
from mirror.status import gather
from tests.logtools import append, project_all, record, snapshot
from tests.signing import envelope


def order(order_id: str, updated: str, status: str, *, kind: str = "order.created",
          previous: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    data = {"id": order_id, "order_number": f"SO-{order_id}", "status": status,
            "created_date": "2025-01-01T09:00:00Z", "updated_date": updated,
            "line_items": [{"sku": "A", "quantity": 1, "unit_price": 2.5, "is_picked": False},
                           {"sku": "B", "quantity": 3, "unit_price": "1.25"}],
            "shipments": [], **fields}
    return envelope(kind, data, previous=previous)


async def test_create_then_update_fills_current_history_and_changes(
        conn: asyncpg.Connection) -> None:
    created = order("o1", "2025-01-01T10:00:00Z", "open")
    updated = order("o1", "2025-01-01T11:00:00Z", "picked", kind="order.updated",
                    previous={"status": "open", "updated_date": "2025-01-01T10:00:00Z"})
    await append(conn, created, updated)
    await project_all(conn)

    row = await conn.fetchrow("SELECT * FROM mirror.orders")
    assert (row["connection_id"], row["id"], row["status"], row["order_number"]) == \
        ("conn_1", "o1", "picked", "SO-o1")
    assert row["updated_date"] == datetime(2025, 1, 1, 11, tzinfo=UTC)
    assert row["data"]["status"] == "picked"
    lines = await conn.fetch(
        "SELECT line_number, sku, quantity, unit_price, is_picked FROM mirror.order_line_items "
        "WHERE order_id = 'o1' ORDER BY line_number")
    assert [(r["sku"], float(r["quantity"]), float(r["unit_price"])) for r in lines] == \
        [("A", 1.0, 2.5), ("B", 3.0, 1.25)]
    versions = await conn.fetch("SELECT * FROM mirror.versions ORDER BY valid_from")
    assert [(v["valid_from"].hour, v["valid_to"] and v["valid_to"].hour) for v in versions] == \
        [(10, 11), (11, None)]
    changes = await conn.fetch("SELECT path, old_value, new_value FROM mirror.changes "
                               "ORDER BY path")
    assert [(c["path"], c["old_value"], c["new_value"]) for c in changes] == [
        ("status", "open", "picked"),
        ("updated_date", "2025-01-01T10:00:00Z", "2025-01-01T11:00:00Z"),
    ]


async def test_late_event_takes_its_place_and_never_overwrites_newer_state(
        conn: asyncpg.Connection) -> None:
    await append(conn, order("o1", "2025-01-01T12:00:00Z", "packed", kind="order.updated"))
    await project_all(conn)
    await append(conn, order("o1", "2025-01-01T10:00:00Z", "open"))
    await project_all(conn)
    assert await conn.fetchval("SELECT status FROM mirror.orders WHERE id = 'o1'") == "packed"
    history = await conn.fetch("SELECT data->>'status' AS s FROM mirror.versions ORDER BY valid_from")
    assert [h["s"] for h in history] == ["open", "packed"]


async def test_duplicate_delivery_changes_nothing(conn: asyncpg.Connection) -> None:
    event = record(order("o1", "2025-01-01T10:00:00Z", "open"))
    await insert_records(conn, [event])
    await project_all(conn)
    before = await snapshot(conn)
    await insert_records(conn, [event])
    await project_all(conn)
    assert await snapshot(conn) == before
    assert await conn.fetchval("SELECT count(*) FROM mirror.events") == 1


async def test_truncated_stub_never_replaces_full_state(conn: asyncpg.Connection) -> None:
    await append(conn, order("o1", "2025-01-01T10:00:00Z", "open"))
    stub = envelope("order.updated", {"id": "o1"}, data_truncated=True,
                    data_url="https://example.invalid/x")
    await append(conn, stub)
    await project_all(conn)
    row = await conn.fetchrow("SELECT status, data FROM mirror.orders WHERE id = 'o1'")
    assert row["status"] == "open" and row["data"]["line_items"]
    assert await conn.fetchval("SELECT count(*) FROM mirror.versions") == 1


async def test_deleted_removes_from_current_and_late_update_cannot_resurrect(
        conn: asyncpg.Connection) -> None:
    url = "https://wms.example/api/orders"
    def err(kind: str, updated: str, **data: Any) -> dict[str, Any]:
        return envelope(kind, {"failed_url": url, "error_message": "boom",
                               "updated_date": updated, **data})
    await append(conn, err("connection-error.created", "2025-01-01T10:00:00Z"))
    await project_all(conn)
    assert await conn.fetchval("SELECT error_message FROM mirror.connection_errors") == "boom"
    await append(conn, err("connection-error.deleted", "2025-01-01T12:00:00Z"))
    await project_all(conn)
    assert await conn.fetchval("SELECT count(*) FROM mirror.connection_errors") == 0
    # An update from before the deletion arrives late: it lands in history, not in current.
    await append(conn, err("connection-error.updated", "2025-01-01T11:00:00Z",
                           error_message="still broken"))
    await project_all(conn)
    assert await conn.fetchval("SELECT count(*) FROM mirror.connection_errors") == 0
    history = await conn.fetch("SELECT event_type, data IS NULL AS gone FROM mirror.versions "
                               "ORDER BY valid_from")
    assert [(h["event_type"], h["gone"]) for h in history] == [
        ("connection-error.created", False), ("connection-error.updated", False),
        ("connection-error.deleted", True)]


async def test_connection_events_merge_and_keep_no_token(conn: asyncpg.Connection) -> None:
    token = "tok_DISTINCT_91ab"
    await append(
        conn,
        envelope("connection.created", {"created_date": "2025-01-01T00:00:00Z",
                                        "access_token": token}, connection_id="c9"),
        envelope("connection.historical-sync-completed",
                 {"resource": "orders", "oldest_data_date": "2024-12-01T00:00:00Z",
                  "newest_data_date": "2025-01-01T00:00:00Z"}, connection_id="c9"),
    )
    await project_all(conn)
    row = await conn.fetchrow("SELECT * FROM mirror.connections")
    assert row["id"] == "c9" and row["integration_name"] == "sandbox"
    assert row["created_date"] == datetime(2025, 1, 1, tzinfo=UTC)
    assert row["historical_syncs"]["orders"]["oldest_data_date"] == "2024-12-01T00:00:00Z"
    dump = await conn.fetchval("SELECT string_agg(t, ' ') FROM (SELECT c::text t FROM "
                               "mirror.connections c UNION ALL SELECT v::text FROM "
                               "mirror.versions v) x")
    assert token not in dump and "access_token" not in row["data"]


async def test_every_resource_gets_its_relation(conn: asyncpg.Connection) -> None:
    from projections import registry

    for resource in registry.resources():
        if resource.key != "data.id":
            continue
        await append(conn, envelope(resource.events[0], {
            "id": f"{resource.name}-1", "updated_date": "2025-01-01T00:00:00Z",
            "sku": "S", "status": "open", "name": "n",
            "line_items": [{"sku": "L"}], "receipts": [{"id": "r1"}], "shipments": [{}]}))
    await project_all(conn)
    for resource in registry.resources():
        if resource.key != "data.id":
            continue
        ids = [r["id"] for r in await conn.fetch(f"SELECT id FROM mirror.{resource.table}")]
        assert ids == [f"{resource.name}-1"], resource.name
        for child in resource.children:
            assert await conn.fetchval(f"SELECT count(*) FROM mirror.{child.table}") == 1


async def _same_part_ids(conn: asyncpg.Connection) -> tuple[str, str]:
    rows = await conn.fetch(
        "SELECT 'o' || g AS id, ((hashtext('order/conn_1/o' || g) & 2147483647) % 16) AS p "
        "FROM generate_series(1, 200) g")
    by_part: dict[int, list[str]] = {}
    for row in rows:
        by_part.setdefault(row["p"], []).append(row["id"])
    pair = next(ids for ids in by_part.values() if len(ids) >= 2)
    return pair[0], pair[1]


async def test_reader_never_skips_a_row_whose_transaction_commits_late(
        db_url: str, conn: asyncpg.Connection) -> None:
    first, second = await _same_part_ids(conn)
    slow = await asyncpg.connect(db_url)
    fast = await asyncpg.connect(db_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await insert_records(slow, [record(order(first, "2025-01-01T10:00:00Z", "open"))])
        await insert_records(fast, [record(order(second, "2025-01-01T10:00:00Z", "open"))])
        positions = dict(await conn.fetch("SELECT object_id, position FROM mirror.events"))
        assert positions == {second: positions[second]}  # the slow one is not visible yet
        await project_all(conn)
        # The fast writer committed, but its row sorts after the open one: it waits.
        assert await conn.fetchval("SELECT count(*) FROM mirror.orders") == 0
        await tx.commit()
        await project_all(conn)
        ids = sorted(r["id"] for r in await conn.fetch("SELECT id FROM mirror.orders"))
        assert ids == sorted([first, second])
        order_positions = dict(await conn.fetch("SELECT object_id, position FROM mirror.events"))
        assert order_positions[first] < order_positions[second]  # committed out of order
    finally:
        await slow.close()
        await fast.close()


async def test_two_workers_never_apply_the_same_batch(db_url: str,
                                                      conn: asyncpg.Connection) -> None:
    await append(conn, *[order(f"o{i}", "2025-01-01T10:00:00Z", "open") for i in range(50)])
    a = await asyncpg.connect(db_url)
    b = await asyncpg.connect(db_url)
    await init_connection(a)
    await init_connection(b)
    try:
        async def drain(c: asyncpg.Connection) -> int:
            total = 0
            for _ in range(40):
                total += await project_page(c, list(range(PARTITIONS)), page_size=3)
            return total
        consumed = await asyncio.gather(drain(a), drain(b))
    finally:
        await a.close()
        await b.close()
    await project_all(conn)
    assert sum(consumed) <= 50
    assert await conn.fetchval("SELECT count(*) FROM mirror.orders") == 50
    assert await conn.fetchval("SELECT count(*) FROM mirror.versions") == 50


async def test_worker_killed_mid_batch_resumes_exactly(db_url: str,
                                                       conn: asyncpg.Connection) -> None:
    await append(conn, *[order(f"o{i}", "2025-01-01T10:00:00Z", "open") for i in range(20)])
    victim = await asyncpg.connect(db_url)
    await init_connection(victim)
    tx = victim.transaction()
    await tx.start()
    await project_page(victim, list(range(PARTITIONS)), page_size=500)
    # Killed before commit: the server rolls the batch back when the connection dies.
    await conn.execute("SELECT pg_terminate_backend($1)", victim.get_server_pid())
    await asyncio.sleep(0.1)
    assert await conn.fetchval("SELECT count(*) FROM mirror.orders") == 0
    victim.terminate()
    await project_all(conn)
    assert await conn.fetchval("SELECT count(*) FROM mirror.orders") == 20
    assert await conn.fetchval("SELECT count(*) FROM mirror.versions") == 20
    assert await conn.fetchval("SELECT sum(last_position) > 0 FROM mirror.checkpoints")


async def test_poison_object_is_recorded_and_does_not_stall_others(
        conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    import mirror.projector as projector

    real = projector.candidates_of

    def fragile(resource: Any, event: Any) -> Any:
        if event.data.get("id") == "poison":
            raise ValueError("cannot fold this one")
        return real(resource, event)

    monkeypatch.setattr(projector, "candidates_of", fragile)
    await append(conn, order("poison", "2025-01-01T10:00:00Z", "open"),
                 order("fine", "2025-01-01T10:00:00Z", "open"))
    await project_all(conn)
    assert [r["id"] for r in await conn.fetch("SELECT id FROM mirror.orders")] == ["fine"]
    poison = await conn.fetchrow("SELECT * FROM mirror.poison")
    assert poison["object_id"] == "poison" and "cannot fold" in poison["reason"]
    report = await gather(conn)
    assert report["poisoned_objects"][0]["object_id"] == "poison"
    assert report["projection_lag_events"] == 0


async def test_unknown_event_types_are_kept_counted_and_listed(conn: asyncpg.Connection) -> None:
    await append(conn, envelope("inventory_ledger.created", {"id": "l1"}),
                 envelope("inventory_ledger.created", {"id": "l2"}),
                 order("o1", "2025-01-01T10:00:00Z", "open"))
    await project_all(conn)
    report = await gather(conn)
    assert report["unknown_event_types"] == {"inventory_ledger.created": 2}
    assert report["unprojectable"] == 2 and report["events"] == 3
    assert report["projection_lag_events"] == 0


async def test_rebuild_equals_live(conn: asyncpg.Connection) -> None:
    events = []
    for i in range(30):
        events.append(order(f"o{i}", "2025-01-01T10:00:00Z", "open"))
        events.append(order(f"o{i}", "2025-01-01T11:00:00Z", "picked", kind="order.updated",
                            previous={"status": "open", "updated_date": "2025-01-01T10:00:00Z"}))
    events.append(envelope("product.created", {"id": "p1", "sku": "P",
                                               "updated_date": "2025-01-01T00:00:00Z"}))
    await append(conn, *events)
    await project_all(conn)
    live = await snapshot(conn)
    counts = await rebuild(conn)
    assert counts["order"] == 30 and counts["product"] == 1
    assert await snapshot(conn) == live
    await rebuild(conn, "order")
    assert await snapshot(conn) == live


async def test_object_the_database_refuses_is_poison_not_a_stall(
        conn: asyncpg.Connection) -> None:
    # A typed column the database will not take (an over-long integer would be cast away, so
    # use a check constraint a user might add) must not stop the partition.
    await conn.execute("ALTER TABLE mirror.orders ADD CONSTRAINT no_x CHECK (status <> 'x')")
    await append(conn, order("bad", "2025-01-01T10:00:00Z", "x"),
                 order("good", "2025-01-01T10:00:00Z", "open"))
    await project_all(conn)
    assert [r["id"] for r in await conn.fetch("SELECT id FROM mirror.orders")] == ["good"]
    poison = await conn.fetchrow("SELECT object_id, reason FROM mirror.poison")
    assert poison["object_id"] == "bad" and "23514" in poison["reason"]
    # Once the cause is gone, a later event for that object folds it cleanly.
    await conn.execute("ALTER TABLE mirror.orders DROP CONSTRAINT no_x")
    await append(conn, order("bad", "2025-01-01T11:00:00Z", "open", kind="order.updated"))
    await project_all(conn)
    assert await conn.fetchval("SELECT status FROM mirror.orders WHERE id = 'bad'") == "open"
    assert await conn.fetchval("SELECT count(*) FROM mirror.poison") == 0


async def test_refold_resolves_only_the_anomalies_the_fold_finds(
        conn: asyncpg.Connection) -> None:
    await append(conn, order("o1", "2025-01-01T10:00:00Z", "open"))
    await project_all(conn)
    await conn.execute(
        "INSERT INTO mirror.anomalies (resource, connection_id, object_id, kind, at, event_id) "
        "VALUES ('order', 'conn_1', 'o1', 'drift', now(), 'reconcile_x')")
    # An out-of-order event forces a full re-fold of the object.
    await append(conn, order("o1", "2025-01-01T09:00:00Z", "open"))
    await project_all(conn)
    assert await conn.fetchval(
        "SELECT resolved_at IS NULL FROM mirror.anomalies WHERE kind = 'drift'")


async def test_posted_webhooks_are_projected_by_the_running_workers(client: Any) -> None:
    from mirror.keys import PROJECTOR
    from tests.signing import signed

    for n in range(5):
        body, headers = signed(order(f"live_{n}", "2025-01-01T10:00:00Z", "open"))
        assert (await client.post("/webhooks", data=body, headers=headers)).status == 200
    projector = client.server.app[PROJECTOR]
    await projector.caught_up(timeout=30)  # NOTIFY woke the workers; nothing sleeps here
    conn = await asyncpg.connect(client.server.app[SETTINGS].database_url)
    try:
        ids = sorted(r["id"] for r in await conn.fetch("SELECT id FROM mirror.orders"))
    finally:
        await conn.close()
    assert ids == [f"live_{n}" for n in range(5)]


async def test_a_refused_object_is_folded_from_its_start_even_with_the_tail_cache(
        conn: asyncpg.Connection) -> None:
    from mirror.projector import TailCache

    cache = TailCache()

    async def fold_all() -> None:
        while await project_page(conn, list(range(PARTITIONS)), page_size=500, cache=cache):
            pass

    await append(conn, order("bad", "2025-01-01T09:00:00Z", "open"))
    await fold_all()
    await conn.execute("ALTER TABLE mirror.orders ADD CONSTRAINT no_x CHECK (status <> 'x')")
    await append(conn, order("bad", "2025-01-01T10:00:00Z", "x", kind="order.updated"))
    await fold_all()
    assert await conn.fetchval("SELECT count(*) FROM mirror.poison") == 1
    await conn.execute("ALTER TABLE mirror.orders DROP CONSTRAINT no_x")
    await append(conn, order("bad", "2025-01-01T11:00:00Z", "packed", kind="order.updated"))
    await fold_all()
    # The refused version is in history now too: the object was folded from its first event,
    # not appended onto a cached tail that the database never stored.
    statuses = [r["s"] for r in await conn.fetch(
        "SELECT data->>'status' AS s FROM mirror.versions WHERE object_id = 'bad' "
        "ORDER BY valid_from")]
    assert statuses == ["open", "x", "packed"]
    assert await conn.fetchval("SELECT count(*) FROM mirror.poison") == 0
