"""Point-in-time reconstruction: SQL functions, derived versions, anomalies, HTTP and CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from mirror.db import init_connection
from tests.conftest import API_TOKEN
from tests.logtools import append, project_all, record
from tests.signing import envelope, iso

T0 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def item(minutes: int, onhand: int, kind: str = "inventory.updated",
         previous: dict[str, Any] | None = None, item_id: str = "inv_1",
         connection_id: str = "conn_1") -> dict[str, Any]:
    data = {"id": item_id, "sku": "SKU-1", "onhand": onhand,
            "created_date": iso(at(0)), "updated_date": iso(at(minutes))}
    return envelope(kind, data, previous=previous, connection_id=connection_id)


async def as_of(conn: asyncpg.Connection, minutes: float, known_at: datetime | None = None,
                object_id: str = "inv_1") -> Any:
    return await conn.fetchval("SELECT mirror.object_as_of('inventory', $1, $2, NULL, $3)",
                               object_id, T0 + timedelta(minutes=minutes), known_at)


async def test_validity_boundaries_before_creation_and_after_deletion(
        conn: asyncpg.Connection) -> None:
    url = "https://wms/x"
    events = [envelope("connection-error.created", {"failed_url": url, "updated_date": iso(at(0)),
                                                    "error_message": "a"}),
              envelope("connection-error.updated", {"failed_url": url, "updated_date": iso(at(10)),
                                                    "error_message": "b"}),
              envelope("connection-error.deleted", {"failed_url": url,
                                                    "updated_date": iso(at(20))})]
    await append(conn, *events)
    await project_all(conn)

    async def state(minutes: float) -> Any:
        value = await conn.fetchval(
            "SELECT mirror.object_as_of('connection-error', $1, $2)", url,
            T0 + timedelta(minutes=minutes))
        return value and value["error_message"]

    assert await state(-0.01) is None            # before creation
    assert await state(0) == "a"                  # inclusive at valid_from
    assert await state(9.99) == "a"
    assert await state(10) == "b"                 # exclusive at valid_to
    assert await state(19.99) == "b"
    assert await state(20) is None                # after deletion
    assert await state(10_000) is None


async def test_object_first_seen_through_an_update_has_a_derived_past(
        conn: asyncpg.Connection) -> None:
    await append(conn, item(10, 7, previous={"onhand": 5, "updated_date": iso(at(5))}))
    await project_all(conn)
    assert await as_of(conn, 4) is None
    assert (await as_of(conn, 5))["onhand"] == 5
    assert (await as_of(conn, 10))["onhand"] == 7
    history = await conn.fetch("SELECT * FROM mirror.object_history('inventory', 'inv_1')")
    assert [(h["derived"], h["data"]["onhand"]) for h in history] == [(True, 5), (False, 7)]
    assert await conn.fetchval("SELECT count(*) FROM mirror.anomalies") == 0


async def test_missed_change_appears_at_its_own_time_and_is_resolved_later(
        conn: asyncpg.Connection) -> None:
    await append(conn, item(0, 1, kind="inventory.created"))
    # The update at minute 10 (onhand 1 -> 4) never arrived; the one at 20 reveals it.
    await append(conn, item(20, 9, previous={"onhand": 4, "updated_date": iso(at(10))}))
    await project_all(conn)
    assert [(await as_of(conn, m))["onhand"] for m in (0, 10, 15, 20)] == [1, 4, 4, 9]
    anomaly = await conn.fetchrow("SELECT * FROM mirror.anomalies")
    assert anomaly["kind"] == "missed_webhook" and anomaly["at"] == at(10)
    assert "onhand" in anomaly["paths"] and anomaly["resolved_at"] is None
    # The missed webhook finally arrives: same history, anomaly resolved, not deleted.
    await append(conn, item(10, 4, previous={"onhand": 1, "updated_date": iso(at(0))}))
    await project_all(conn)
    assert [(await as_of(conn, m))["onhand"] for m in (0, 10, 15, 20)] == [1, 4, 4, 9]
    assert await conn.fetchval("SELECT resolved_at IS NOT NULL FROM mirror.anomalies")
    history = await conn.fetch("SELECT derived FROM mirror.object_history('inventory', 'inv_1')")
    assert [h["derived"] for h in history] == [False, False, False]


async def test_any_arrival_order_gives_the_same_history(server_url: str,
                                                        template_db: str) -> None:
    from tests.conftest import with_database

    events = [record(item(0, 1, kind="inventory.created")),
              record(item(10, 4, previous={"onhand": 1, "updated_date": iso(at(0))})),
              record(item(20, 9, previous={"onhand": 4, "updated_date": iso(at(10))})),
              record(item(30, 2, previous={"onhand": 8, "updated_date": iso(at(25))}))]
    results = set()
    admin = await asyncpg.connect(server_url)
    try:
        for n, perm in enumerate(itertools.permutations(events)):
            if n % 4:  # 6 of the 24 orders keep the test quick
                continue
            name = f"mirror_perm_{os.getpid()}_{n}"
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
            try:
                c = await asyncpg.connect(with_database(server_url, name))
                await init_connection(c)
                for event in perm:  # one at a time, projecting in between
                    await append(c, event)
                    await project_all(c)
                rows = await c.fetch("SELECT valid_from, valid_to, data::text, derived "
                                     "FROM mirror.object_history('inventory', 'inv_1')")
                results.add(tuple(tuple(r) for r in rows))
                await c.close()
            finally:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    assert len(results) == 1
    (history,) = results
    # 0, 10, 20, the revealed 25 (a missed change), 30
    assert [r[0] for r in history] == [at(0), at(10), at(20), at(25), at(30)]


async def test_known_at_counts_only_what_had_been_received(conn: asyncpg.Connection) -> None:
    r1 = record(item(0, 1, kind="inventory.created"), received_at=at(1))
    r2 = record(item(20, 9, previous={"onhand": 4, "updated_date": iso(at(10))}),
                received_at=at(60))
    await append(conn, r1, r2)
    await project_all(conn)
    assert (await as_of(conn, 15, known_at=at(30)))["onhand"] == 1   # minute 10 unknown yet
    assert (await as_of(conn, 15, known_at=at(60)))["onhand"] == 4   # revealed at receipt
    assert (await as_of(conn, 25, known_at=at(30)))["onhand"] == 1
    assert await as_of(conn, 25, known_at=at(0)) is None


async def test_table_as_of_matches_a_brute_force_replay(conn: asyncpg.Connection) -> None:
    import random

    rng = random.Random(7)
    events = []
    for n in range(40):
        minutes = sorted(rng.sample(range(1, 100), 3))
        for step, minute in enumerate(minutes):
            events.append(item(minute, rng.randint(0, 50), item_id=f"inv_{n}",
                               kind="inventory.created" if step == 0 else "inventory.updated"))
    rng.shuffle(events)
    await append(conn, *events)
    await project_all(conn)
    for probe in (0, 25, 50, 75, 120):
        expected: dict[str, Any] = {}
        for e in events:
            t = datetime.fromisoformat(e["data"]["updated_date"].replace("Z", "+00:00"))
            if t <= at(probe):
                best = expected.get(e["data"]["id"])
                if best is None or best["updated_date"] < e["data"]["updated_date"]:
                    expected[e["data"]["id"]] = e["data"]
        rows = await conn.fetch("SELECT id, data FROM mirror.table_as_of('inventory', $1)",
                                at(probe))
        assert {r["id"]: r["data"] for r in rows} == expected


async def test_ambiguous_id_across_connections_raises(conn: asyncpg.Connection) -> None:
    await append(conn, item(0, 1, connection_id="a"), item(0, 2, connection_id="b"))
    await project_all(conn)
    with pytest.raises(asyncpg.CardinalityViolationError, match="connection_id"):
        await as_of(conn, 5)
    assert (await conn.fetchval("SELECT mirror.object_as_of('inventory', 'inv_1', $1, 'b')",
                                at(5)))["onhand"] == 2
    with pytest.raises(asyncpg.InvalidParameterValueError, match="unknown resource"):
        await conn.fetchval("SELECT mirror.object_as_of('nope', 'x', now())")


async def test_keys_with_dots_slashes_tildes_and_numbers(conn: asyncpg.Connection) -> None:
    data = {"id": "p1", "updated_date": iso(at(10)), "additional_fields": {
        "a.b": 2, "x/y": 3, "t~u": 4, "0": 5}, "tags": ["n", "m"]}
    previous = {"updated_date": iso(at(5)), "additional_fields.a.b": 1, "additional_fields.x/y": 0,
                "additional_fields.t~u": 9, "additional_fields.0": 6, "tags.1": "old"}
    await append(conn, envelope("product.updated", data, previous=previous))
    await project_all(conn)
    before = await conn.fetchval("SELECT mirror.object_as_of('product', 'p1', $1)", at(5))
    assert before["additional_fields"] == {"a.b": 1, "x/y": 0, "t~u": 9, "0": 6}
    assert before["tags"] == ["n", "old"]
    paths = {r["path"] for r in await conn.fetch("SELECT path FROM mirror.changes")}
    assert paths >= {"additional_fields.a.b", "additional_fields.x/y", "tags.1"}


async def _seed_http(db_url: str) -> None:
    c = await asyncpg.connect(db_url)
    await init_connection(c)
    await append(c, item(0, 1, kind="inventory.created"),
                 item(10, 3, previous={"onhand": 1, "updated_date": iso(at(0))}),
                 envelope("inbound_shipment.created", {"id": "is_1", "status": "open",
                                                       "updated_date": iso(at(0))}))
    await project_all(c)
    await c.close()


async def test_http_read_api(client: TestClient[Any, Any], db_url: str) -> None:
    await _seed_http(db_url)
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    r = await client.get("/objects/inventory/inv_1", params={"at": iso(at(5))}, headers=auth)
    assert r.status == 200
    body = await r.json()
    assert body["data"]["onhand"] == 1 and body["connection_id"] == "conn_1"
    assert body["resource"] == "inventory" and body["id"] == "inv_1"
    current = await (await client.get("/objects/inventory/inv_1", headers=auth)).json()
    assert current["data"]["onhand"] == 3
    dashed = await client.get("/objects/inbound-shipment/is_1", headers=auth)
    assert (await dashed.json())["data"]["status"] == "open"
    hist = await (await client.get("/objects/inventory/inv_1/history", headers=auth)).json()
    assert [v["data"]["onhand"] for v in hist["versions"]] == [1, 3]
    assert (await client.get("/objects/inventory/inv_1",
                             params={"at": iso(at(-5))}, headers=auth)).status == 404
    assert (await client.get("/objects/inventory/nope", headers=auth)).status == 404
    assert (await client.get("/objects/inventory/inv_1", params={"at": "tuesday"},
                             headers=auth)).status == 400
    assert (await client.get("/objects/nope/inv_1", headers=auth)).status == 400
    for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN}):
        r = await client.get("/objects/inventory/inv_1", headers=bad)
        assert r.status == 401
        assert "onhand" not in await r.text()
    injected = await client.get("/objects/inventory/x'; DROP TABLE mirror.events; --",
                                headers=auth)
    assert injected.status == 404


async def test_cli_prints_what_sql_returns(db_url: str, conn: asyncpg.Connection) -> None:
    await _seed_http(db_url)
    env = {**os.environ, "DATABASE_URL": db_url, "MIRROR_LOG_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-m", "mirror", "as-of", "inventory", "inv_1",
                          "--at", iso(at(5))], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    expected = await conn.fetchval("SELECT mirror.object_as_of('inventory', 'inv_1', $1)", at(5))
    assert json.loads(out.stdout) == expected
    missing = subprocess.run([sys.executable, "-m", "mirror", "as-of", "inventory", "inv_1",
                              "--at", iso(at(-5))], env=env, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and "no state" in missing.stderr
    hist = subprocess.run([sys.executable, "-m", "mirror", "history", "inventory", "inv_1",
                           "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert [v["data"]["onhand"] for v in json.loads(hist.stdout)] == [1, 3]


async def _plan(conn: asyncpg.Connection, object_id: str, when: datetime,
                known: datetime | None = None) -> dict[str, Any]:
    raw = await conn.fetchval(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT mirror.state_data(v) "
        "FROM mirror.version_at('inventory', 'conn_1', $1, $2, $3) v", object_id, when, known)
    plan: dict[str, Any] = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return plan


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


async def test_object_as_of_is_one_index_probe_at_ten_thousand_versions(
        conn: asyncpg.Connection) -> None:
    deep = [item(0, 0, kind="inventory.created", item_id="deep")]
    deep += [item(m, m % 97, item_id="deep") for m in range(1, 10_000)]
    await append(conn, *deep, item(0, 5, kind="inventory.created", item_id="shallow"))
    await project_all(conn, batch_size=20_000)
    assert await conn.fetchval("SELECT count(*) FROM mirror.versions WHERE object_id = 'deep'"
                               ) == 10_000
    await conn.execute("ANALYZE mirror.states")
    everything_known = datetime(2100, 1, 1, tzinfo=UTC)
    for known in (None, everything_known):
        probes = {}
        for object_id, minute in (("deep", 5_000), ("deep", 9_999), ("shallow", 10)):
            plan = await _plan(conn, object_id, at(minute), known)
            nodes = _nodes(plan)
            scans = [n for n in nodes if "Relation Name" in n]  # scans of tables
            # Index probes only (the state, then its data in the log), never a scan of
            # the object's history.
            assert {n["Node Type"] for n in scans} <= {"Index Scan", "Index Only Scan"}, nodes
            assert "states_pkey" in {n["Index Name"] for n in scans}
            assert all(n["Actual Rows"] <= 1 for n in scans)  # stops at the first match
            probes[(object_id, minute)] = (plan["Shared Hit Blocks"]
                                           + plan.get("Shared Read Blocks", 0))
        # The buffers touched do not grow with history depth (a B-tree level or two at most).
        assert probes[("deep", 5_000)] <= probes[("shallow", 10)] + 4, probes
        assert probes[("deep", 9_999)] <= probes[("shallow", 10)] + 4, probes
    assert (await as_of(conn, 5_000, object_id="deep"))["onhand"] == 5_000 % 97


async def test_revealed_state_without_time_is_checked_for_consistency(
        conn: asyncpg.Connection) -> None:
    await append(conn, item(0, 1, kind="inventory.created"))
    # The update says onhand was 4 just before, but the last state we received had 1 and it
    # does not say when that changed: a missed change at an unknown time.
    await append(conn, item(20, 9, previous={"onhand": 4}))
    await project_all(conn)
    anomaly = await conn.fetchrow("SELECT kind, paths, at FROM mirror.anomalies")
    assert anomaly["kind"] == "inconsistent" and anomaly["paths"] == ["onhand"]
    assert anomaly["at"] == at(20)
    history = await conn.fetch("SELECT derived FROM mirror.object_history('inventory', 'inv_1')")
    assert [h["derived"] for h in history] == [False, False]  # nothing placed at a guess


async def test_two_received_states_for_one_instant_are_a_conflict(
        conn: asyncpg.Connection) -> None:
    from mirror.ksuid import message_id
    # Logged in this order, but the second was sent first (its svix-id time is earlier).
    await append(conn, record(item(10, 1, kind="inventory.created"), message_id(at(11))),
                 record(item(10, 2), message_id(at(10))))
    await project_all(conn)
    anomaly = await conn.fetchrow("SELECT kind, paths FROM mirror.anomalies")
    assert anomaly["kind"] == "conflict" and anomaly["paths"] == ["onhand"]
    # Ties are decided by the set alone: the later-sent state holds, not the later-logged.
    assert (await as_of(conn, 10))["onhand"] == 1


async def test_known_at_only_counts_connections_known_by_then(conn: asyncpg.Connection) -> None:
    await append(conn, record(item(0, 1, connection_id="a"), received_at=at(1)),
                 record(item(0, 2, connection_id="b"), received_at=at(60)))
    await project_all(conn)
    # At minute 30 only connection a had sent inv_1: no ambiguity then.
    assert (await as_of(conn, 5, known_at=at(30)))["onhand"] == 1
    with pytest.raises(asyncpg.CardinalityViolationError):
        await as_of(conn, 5, known_at=at(90))
