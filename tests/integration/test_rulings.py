"""Each ruling of the README's "How time and order work" and of the point-in-time functions,
against the real database, under the arrival orders that used to break it, and the bitemporal
law: a later delivery never changes an answer for an earlier known_at."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.ksuid import message_id
from tests.logtools import append, project_all, record
from tests.signing import envelope, iso

T0 = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)
ARRIVAL = datetime(2025, 6, 3, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def arrived(seconds: float) -> datetime:
    return ARRIVAL + timedelta(seconds=seconds)


def order(minute: float | None, status: str, *, kind: str = "order.updated",
          previous: dict[str, Any] | None = None, oid: str = "o1", **fields: Any,
          ) -> dict[str, Any]:
    data: dict[str, Any] = {"id": oid, "order_number": f"SO-{oid}", "status": status,
                            "created_date": iso(T0), **fields}
    if minute is not None:
        data["updated_date"] = iso(at(minute))
    return envelope(kind, data, previous=previous)


def was(minute: float, status: str, **more: Any) -> dict[str, Any]:
    return {"status": status, "updated_date": iso(at(minute)), **more}


async def deliver(conn: asyncpg.Connection, event: dict[str, Any], second: float,
                  sent: datetime | None = None, msg: str | None = None) -> str:
    """Append one delivery received at ARRIVAL + ``second`` and project it. Unless told
    otherwise it was sent when its object changed (its updated_date)."""
    if sent is None:
        stamp = event["data"].get("updated_date")
        sent = datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else at(0)
    msg = msg or message_id(sent)
    await append(conn, record(event, msg, received_at=arrived(second)))
    await project_all(conn)
    return msg


async def state(conn: asyncpg.Connection, minute: float, known: float | None = None,
                oid: str = "o1", resource: str = "order") -> Any:
    known_at = arrived(known) if known is not None else None
    return await conn.fetchval("SELECT mirror.object_as_of($1, $2, $3, NULL, $4)",
                               resource, oid, at(minute), known_at)


async def history(conn: asyncpg.Connection, oid: str = "o1",
                  resource: str = "order") -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM mirror.object_history($1, $2)", resource, oid)


async def open_anomalies(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await conn.fetch("SELECT kind, object_id FROM mirror.anomalies "
                            "WHERE resolved_at IS NULL ORDER BY 1, 2")
    return [(r["kind"], r["object_id"]) for r in rows]


async def test_update_before_its_create_keeps_the_known_at_answer(
        conn: asyncpg.Connection) -> None:
    await deliver(conn, order(10, "picked", previous=was(0, "open")), 0)
    assert (await state(conn, 5, known=1))["status"] == "open"  # revealed v1, derived
    await deliver(conn, order(0, "open", kind="order.created"), 10)
    # Known at 1 s, only the update had arrived: the same answer as before the create came.
    assert (await state(conn, 5, known=1))["status"] == "open"
    assert (await state(conn, 5))["status"] == "open"
    versions = await history(conn)
    assert [(v["data"]["status"], v["derived"]) for v in versions] == \
        [("open", False), ("picked", False)]


async def test_a_missed_webhook_delivered_late_keeps_what_was_revealed_before(
        conn: asyncpg.Connection) -> None:
    await deliver(conn, order(0, "open", kind="order.created"), 0)
    # v2 (picked at 10) is lost for now; v3 reveals it.
    await deliver(conn, order(20, "packed", previous=was(10, "picked")), 5)
    assert (await state(conn, 15, known=6))["status"] == "picked"
    assert await open_anomalies(conn) == [("missed_webhook", "o1")]
    # The Svix retry brings v2 at last.
    await deliver(conn, order(10, "picked", previous=was(0, "open")), 60)
    assert (await state(conn, 15, known=6))["status"] == "picked"
    assert (await state(conn, 15))["status"] == "picked"
    assert await open_anomalies(conn) == []  # explained, and kept as resolved
    assert await conn.fetchval("SELECT count(*) FROM mirror.anomalies "
                               "WHERE resolved_at IS NOT NULL") == 1
    assert [v["derived"] for v in await history(conn)] == [False, False, False]


async def test_the_same_state_twice_is_one_version_with_no_changes(
        conn: asyncpg.Connection) -> None:
    await deliver(conn, order(0, "open", kind="order.created"), 0)
    # A backfill snapshot of the very same state under another id, then the same again later.
    same = order(0, "open")
    await append(conn, record(same, "backfill_x1", received_at=arrived(5)))
    await deliver(conn, order(0, "open"), 9)
    await deliver(conn, order(30, "open"), 12)  # new updated_date, equal otherwise
    await project_all(conn)
    # Three deliveries of one state at minute 0 are one version, kept from the first; the
    # state at minute 30 differs only by its updated_date: one more version, one change row.
    versions = await history(conn)
    assert [(v["valid_from"], v["valid_to"]) for v in versions] == [(at(0), at(30)),
                                                                     (at(30), None)]
    # Of equal states at one instant the last sent holds: the snapshot, fetched at arrival.
    assert versions[0]["event_id"] == "backfill_x1"
    changes = await conn.fetch("SELECT path, changed_at FROM mirror.changes")
    assert [(c["path"], c["changed_at"]) for c in changes] == [("updated_date", at(30))]


async def test_the_loser_of_a_tie_is_not_a_version(conn: asyncpg.Connection) -> None:
    early = message_id(at(1))
    late = message_id(at(2))
    await deliver(conn, order(0, "open", kind="order.created"), 0)
    # Two different states claim minute 5; the later-sent one holds whatever the arrival order.
    await deliver(conn, order(5, "packed"), 2, msg=late)
    await deliver(conn, order(5, "picked"), 3, msg=early)
    versions = await history(conn)
    assert [v["data"]["status"] for v in versions] == ["open", "packed"]
    assert await conn.fetchval("SELECT count(*) FROM mirror.changes WHERE new_value = "
                               "'\"picked\"'") == 0
    assert await open_anomalies(conn) == [("conflict", "o1")]


async def test_a_state_revealed_as_predecessor_at_the_same_instant_comes_first(
        conn: asyncpg.Connection) -> None:
    # Two updates in one second: the second reveals the first as its predecessor, so it holds
    # even though its svix id sorts first.
    first = order(5, "picked")
    second = order(5, "packed", previous={"status": "picked"})
    await deliver(conn, order(0, "open", kind="order.created"), 0)
    await deliver(conn, second, 1, msg=message_id(at(1)))
    await deliver(conn, first, 2, msg=message_id(at(9)))
    assert (await state(conn, 6))["status"] == "packed"
    assert await open_anomalies(conn) == []


async def test_an_added_field_written_as_null_is_no_conflict(conn: asyncpg.Connection) -> None:
    await deliver(conn, order(0, "open", kind="order.created"), 0)
    # The update added `gift_note`; Trackstar writes its previous value as null.
    await deliver(conn, order(10, "picked", gift_note="hi",
                              previous=was(0, "open", gift_note=None)), 1)
    assert await open_anomalies(conn) == []
    assert [v["derived"] for v in await history(conn)] == [False, False]


async def test_same_data_as_update_and_shipment_event_is_not_inconsistent(
        conn: asyncpg.Connection) -> None:
    await deliver(conn, order(0, "open", kind="order.created", shipments=[]), 0)
    shipped = {"shipments": [{"shipment_id": "s1", "status": "shipped"}]}
    await deliver(conn, order(10, "fulfilled", **shipped,
                              previous={"status": "open", "shipments": []}), 1)
    await deliver(conn, order(10, "fulfilled", kind="order.shipment.created", **shipped,
                              previous={"shipments": []}), 2)
    assert await open_anomalies(conn) == []
    assert len(await history(conn)) == 2


async def test_two_historical_syncs_in_one_second_merge(conn: asyncpg.Connection) -> None:
    def sync(resource: str) -> dict[str, Any]:
        return envelope("connection.historical-sync-completed",
                        {"resource": resource, "oldest_data_date": iso(T0)},
                        connection_id="c7")
    same_second = at(3)
    await deliver(conn, envelope("connection.created", {"created_date": iso(at(0))},
                                 connection_id="c7"), 0)
    await deliver(conn, sync("orders"), 1, sent=same_second)
    await deliver(conn, sync("inventory"), 2, sent=same_second)
    assert await open_anomalies(conn) == []
    now = await conn.fetchval("SELECT historical_syncs FROM mirror.connections")
    assert set(now) == {"orders", "inventory"}
    as_of = await state(conn, 10, resource="connection", oid="c7")
    assert set(as_of["historical_syncs"]) == {"orders", "inventory"}
    # Known before the second sync arrived: only the first.
    early = await state(conn, 10, known=1.5, resource="connection", oid="c7")
    assert set(early["historical_syncs"]) == {"orders"}


async def test_a_deletion_beats_an_update_at_the_same_instant_in_any_order(
        conn: asyncpg.Connection) -> None:
    url = "https://wms.example/api/x"

    def err(kind: str, **data: Any) -> dict[str, Any]:
        return envelope(kind, {"failed_url": url, "error_message": "boom",
                               "updated_date": iso(at(5)), **data})
    for n, kinds in enumerate((["connection-error.deleted", "connection-error.updated"],
                               ["connection-error.updated", "connection-error.deleted"])):
        await conn.execute("DELETE FROM mirror.connection_errors")
        for i, kind in enumerate(kinds):
            await deliver(conn, err(kind, failed_url=f"{url}/{n}"), n * 10 + i,
                          msg=message_id(at(5 + i)))
        assert await state(conn, 6, oid=f"{url}/{n}", resource="connection-error") is None
    assert await conn.fetchval("SELECT count(*) FROM mirror.connection_errors") == 0


async def test_update_without_updated_date_does_not_go_back_to_created_date(
        conn: asyncpg.Connection) -> None:
    await deliver(conn, order(0, "open", kind="order.created"), 0, sent=at(0))
    await deliver(conn, order(30, "picked"), 1, sent=at(30))
    # No updated_date: placed at its svix-id time (minute 40), not at created_date (minute 0).
    await deliver(conn, order(None, "packed"), 2, sent=at(40))
    assert await conn.fetchval("SELECT status FROM mirror.orders") == "packed"
    assert (await state(conn, 35))["status"] == "picked"


async def test_a_far_future_updated_date_is_clock_skew_and_does_not_freeze_the_object(
        conn: asyncpg.Connection) -> None:
    await deliver(conn, order(0, "open", kind="order.created"), 0, sent=at(0))
    # A WMS clock bug: a year ahead. Placed at its svix-id time instead.
    await deliver(conn, order(60 * 24 * 365, "picked"), 1, sent=at(10))
    await deliver(conn, order(20, "packed"), 2, sent=at(20))
    assert await conn.fetchval("SELECT status FROM mirror.orders") == "packed"
    assert (await state(conn, 15))["status"] == "picked"
    assert await open_anomalies(conn) == [("clock_skew", "o1")]


async def test_a_revealed_state_without_time_that_disagrees_is_inconsistent(
        conn: asyncpg.Connection) -> None:
    await deliver(conn, order(0, "open", kind="order.created"), 0)
    await deliver(conn, order(10, "packed", previous={"status": "picked"}), 1)
    rows = await conn.fetch("SELECT kind, paths FROM mirror.anomalies")
    assert [(r["kind"], r["paths"]) for r in rows] == [("inconsistent", ["status"])]


# ---------------------------------------------------------------------------------------------
# The bitemporal law against the database


@st.composite
def deliveries(draw: st.DrawFn) -> list[dict[str, Any]]:
    steps = draw(st.integers(2, 6))
    minute = 0
    truth: list[tuple[int, str]] = []
    for _ in range(steps):
        minute += draw(st.sampled_from([0, 2, 7]))
        truth.append((minute, draw(st.sampled_from(["open", "picked", "packed", "held"]))))
    out = []
    for i, (m, status) in enumerate(truth):
        if 0 < i < len(truth) - 1 and not draw(st.booleans()):
            continue  # lost
        previous = None
        if i:
            previous = {"status": truth[i - 1][1]}
            if draw(st.booleans()):
                previous["updated_date"] = iso(at(truth[i - 1][0]))
        out.append({"minute": m, "status": status, "previous": previous,
                    "kind": "order.created" if i == 0 else "order.updated"})
    return out


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(deliveries(), st.randoms(use_true_random=False), st.integers(0, 10**6))
async def test_a_later_delivery_never_changes_an_earlier_known_at_answer(
        conn: asyncpg.Connection, plan: list[dict[str, Any]], rnd: random.Random,
        salt: int) -> None:
    oid = f"law_{salt}_{rnd.randint(0, 10**9)}"
    rnd.shuffle(plan)
    instants = [*sorted({p["minute"] for p in plan}), 10000]
    seen: dict[tuple[int, int], Any] = {}
    for n, p in enumerate(plan):
        event = order(p["minute"], p["status"], kind=p["kind"], previous=p["previous"],
                      oid=oid)
        second = salt % 1000 * 100 + n
        await deliver(conn, event, second, msg=message_id(at(p["minute"] + rnd.random())))
        for k in range(n + 1):
            for minute in instants:
                got = await state(conn, minute, known=salt % 1000 * 100 + k, oid=oid)
                answer = got["status"] if got else None
                key = (k, minute)
                if key in seen:
                    assert seen[key] == answer, (p, key)
                seen[key] = answer


async def test_table_as_of_sees_objects_changed_and_deleted_since(
        conn: asyncpg.Connection) -> None:
    url = "https://wms.example/api/gone"

    def err(kind: str, minute: int, message: str) -> dict[str, Any]:
        return envelope(kind, {"failed_url": url, "error_message": message,
                               "updated_date": iso(at(minute))})
    await deliver(conn, err("connection-error.created", 0, "boom"), 0)
    await deliver(conn, order(0, "open", kind="order.created"), 1)
    await deliver(conn, order(20, "packed"), 2)
    await deliver(conn, err("connection-error.deleted", 30, "boom"), 3)

    async def table(resource: str, minute: int) -> dict[str, Any]:
        rows = await conn.fetch("SELECT id, data FROM mirror.table_as_of($1, $2)",
                                resource, at(minute))
        return {r["id"]: r["data"] for r in rows}
    assert (await table("order", 10))["o1"]["status"] == "open"    # changed since: probed
    assert (await table("order", 25))["o1"]["status"] == "packed"  # current, read as it is
    assert list(await table("connection-error", 10)) == [url]      # deleted since: probed
    assert await table("connection-error", 40) == {}
    # Revived by a later event: no longer listed as deleted.
    await deliver(conn, err("connection-error.created", 50, "again"), 4)
    assert (await table("connection-error", 60))[url]["error_message"] == "again"
    assert not await conn.fetchval("SELECT deleted FROM mirror.objects WHERE object_id = $1",
                                   url)
