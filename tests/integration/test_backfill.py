"""Backfill, reconcile and fetch-truncated against a fake Trackstar API on loopback (no test
touches the internet) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from mirror.db import init_connection
from mirror.history import object_as_of, object_history
from mirror.ksuid import time_of as ksuid_time
from mirror.trackstar import backfill as backfill_module
from mirror.trackstar.backfill import Progress, ResourceResult, backfill
from mirror.trackstar.client import (
    ApiSettings,
    RetryPolicy,
    TrackstarClient,
    retry_after_seconds,
)
from mirror.trackstar.completion import fetch_truncated
from mirror.trackstar.reconcile import reconcile
from projections import registry
from projections.base import parse_time
from tests.conftest import fresh_database
from tests.fake_trackstar import DROP, FakeTrackstar
from tests.logtools import append, project_all, record
from tests.signing import envelope, iso

API_KEY = "tsk_FAKE_API_KEY_5b1e0c77"
TOKEN = "tok_ACCESS_NEVER_STORED_9f8e7d6c"
CONN = "conn_bf"
BASE = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
FAST_RETRY = RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05)
PATHS = {
    "order": "/wms/orders", "inventory": "/wms/inventory", "product": "/wms/products",
    "inbound_shipment": "/wms/inbound-shipments", "return": "/wms/returns",
    "shipping_method": "/wms/shipping-methods", "bill": "/wms/billing",
    "warehouse": "/wms/warehouses", "warehouse_customer": "/wms/warehouse-customers",
}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture
async def fake() -> AsyncIterator[FakeTrackstar]:
    api = FakeTrackstar(api_key=API_KEY, tokens={TOKEN: CONN})
    await api.start()
    yield api
    await api.close()


@pytest.fixture
def other_db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A second fresh database, for comparing two runs."""
    with fresh_database(server_url, template_db) as url:
        yield url


def client_for(fake: FakeTrackstar, rate: float = 1000.0) -> TrackstarClient:
    return TrackstarClient(ApiSettings(fake.url, API_KEY, TOKEN, rate), retry=FAST_RETRY)


async def run_backfill(conn: asyncpg.Connection, fake: FakeTrackstar, *, rate: float = 1000.0,
                       **options: Any) -> list[ResourceResult]:
    async with client_for(fake, rate) as client:
        return await backfill(conn, client, CONN, **options)


def at(minutes: float) -> str:
    return iso(BASE + timedelta(minutes=minutes))


def populate(fake: FakeTrackstar, *, orders: int = 0, inventory: int = 0, products: int = 0,
             inbound: int = 0, returns: int = 0, shipping: int = 0, warehouses: int = 0,
             locations: int = 0, customers: int = 0, bills: int = 0) -> int:
    """Fill the fake's lists with realistic objects; return how many there are."""
    def stamp(i: int) -> dict[str, str]:
        return {"created_date": at(-60), "updated_date": at(i % 500)}

    for i in range(orders):
        fake.put(CONN, PATHS["order"], {
            "id": f"ord_{i:05d}", "order_number": f"SO-{i}", "status": "open",
            "warehouse_id": "wh_0", "type": "d2c", "total_price": 10 + i % 7, **stamp(i),
            "line_items": [{"product_id": f"prod_{i % 40}", "sku": f"SKU-{i % 40}",
                            "quantity": 1 + i % 3, "unit_price": 9.5, "is_picked": False}],
            "shipments": [], "additional_fields": {"gift": i % 2 == 0}})
    for i in range(inventory):
        fake.put(CONN, PATHS["inventory"], {
            "id": f"inv_{i:05d}", "sku": f"SKU-{i}", "name": f"Item {i}", "onhand": i % 90,
            "fulfillable": i % 80, "active": True, **stamp(i),
            "locations": [{"location_id": "loc_0_0", "quantity": i % 90,
                           "warehouse_id": "wh_0"}]})
    for i in range(products):
        fake.put(CONN, PATHS["product"], {
            "id": f"prod_{i:05d}", "sku": f"SKU-{i}", "name": f"Product {i}", "is_kit": False,
            **stamp(i), "inventory_items": [{"inventory_item_id": f"inv_{i:05d}",
                                             "sku": f"SKU-{i}", "unit_quantity": 1}]})
    for i in range(inbound):
        fake.put(CONN, PATHS["inbound_shipment"], {
            "id": f"is_{i:05d}", "status": "in-transit", "purchase_order_number": f"PO-{i}",
            **stamp(i), "line_items": [{"sku": "SKU-1", "expected_quantity": 5,
                                        "received_quantity": 0}], "receipts": []})
    for i in range(returns):
        fake.put(CONN, PATHS["return"], {"id": f"ret_{i:05d}", "status": "open",
                                         "order_id": f"ord_{i:05d}", **stamp(i)})
    for i in range(shipping):
        fake.put(CONN, PATHS["shipping_method"], {"id": f"sm_{i}", "name": f"Ground {i}",
                                                  "carrier_name": "UPS", **stamp(i)})
    for i in range(customers):
        fake.put(CONN, PATHS["warehouse_customer"], {"id": f"wc_{i}", "name": f"Brand {i}",
                                                     **stamp(i)})
    for i in range(bills):
        fake.put(CONN, PATHS["bill"], {"id": f"bill_{i}", "amount": 3.5, "currency_code": "USD",
                                       **stamp(i)})
    for w in range(warehouses):
        fake.put(CONN, PATHS["warehouse"], {"id": f"wh_{w}", "name": f"Warehouse {w}",
                                            "code": f"W{w}", **stamp(w)})
        for n in range(locations):
            fake.put(CONN, f"/wms/warehouses/wh_{w}/locations", {
                "id": f"loc_{w}_{n}", "name": f"A-{n}", "warehouse_id": f"wh_{w}",
                "type": "bin", **stamp(n)})
    return (orders + inventory + products + inbound + returns + shipping + customers + bills
            + warehouses * (1 + locations))


def expected_state(fake: FakeTrackstar, resource: str) -> dict[str, dict[str, Any]]:
    """What the API lists for a resource, by id."""
    if resource == "warehouse_location":
        out: dict[str, dict[str, Any]] = {}
        for wid in fake.listed(CONN, PATHS["warehouse"]):
            out.update(fake.listed(CONN, f"/wms/warehouses/{wid}/locations"))
        return out
    return fake.listed(CONN, PATHS[resource])


async def current_state(conn: asyncpg.Connection, resource: str) -> dict[str, dict[str, Any]]:
    found = registry.by_name(resource)
    assert found is not None
    rows = await conn.fetch(f"SELECT id, data FROM mirror.{found.table} WHERE connection_id = $1",
                            CONN)
    return {r["id"]: r["data"] for r in rows}


LOG_SQL = """
SELECT event_id, origin, event_type, connection_id, resource, object_id, data, body,
       unusable_reason
FROM mirror.events ORDER BY event_id
"""


async def log_of(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """The log without what depends on when it was written (positions, arrival times)."""
    return [tuple(r) for r in await conn.fetch(LOG_SQL)]


def cli_env(db_url: str, fake: FakeTrackstar) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_TRACKSTAR_")}
    env.update(DATABASE_URL=db_url, MIRROR_TRACKSTAR_BASE_URL=fake.url,
               MIRROR_TRACKSTAR_API_KEY=API_KEY, MIRROR_TRACKSTAR_ACCESS_TOKEN=TOKEN,
               MIRROR_LOG_LEVEL="DEBUG")
    return env


async def run_cli(db_url: str, fake: FakeTrackstar, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", *args, env=cli_env(db_url, fake),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ---------------------------------------------------------------------------------------------
# Backfill
# ---------------------------------------------------------------------------------------------
async def test_full_backfill_mirrors_every_resource_through_failures(
        fake: FakeTrackstar, conn: asyncpg.Connection) -> None:
    total = populate(fake, orders=2000, inventory=600, products=400, inbound=150, returns=120,
                     shipping=8, warehouses=3, locations=60, customers=5, bills=30)
    fake.unsupported.add("/wms/billing")
    fake.error_every = 6                    # every 6th list request answers 503
    fake.inject = [502, DROP]               # and the first two fail in other ways
    progress = io.StringIO()

    results = await run_backfill(conn, fake, page_size=250, progress=progress)

    by_name = {r.resource: r for r in results}
    assert by_name["bill"].status == "unsupported"
    assert "501" in by_name["bill"].message
    assert {r.resource for r in results if r.status == "done"} == {
        "warehouse", "warehouse_location", "warehouse_customer", "shipping_method", "product",
        "inventory", "order", "inbound_shipment", "return"}
    stored = total - 30                     # every object but the unsupported bills
    assert sum(r.appended for r in results) == stored
    assert by_name["order"].pages == 8 and by_name["warehouse_location"].pages == 3
    counts = await conn.fetchrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE origin = 'backfill') AS backfill, "
        "count(*) FILTER (WHERE unusable_reason IS NOT NULL) AS unusable, "
        "count(DISTINCT event_type) AS types FROM mirror.events")
    assert (counts["n"], counts["backfill"], counts["unusable"], counts["types"]) == \
        (stored, stored, 0, 9)
    statuses = [r.status for r in fake.served()]
    assert statuses[:3] == [502, 500, 200]     # a 502, a dropped connection, then the page
    assert statuses.count(503) >= 4            # and every 6th request failing: all retried

    await project_all(conn)
    for resource in ("warehouse", "warehouse_location", "warehouse_customer", "shipping_method",
                     "product", "inventory", "order", "inbound_shipment", "return"):
        assert await current_state(conn, resource) == expected_state(fake, resource), resource
    assert await current_state(conn, "bill") == {}
    assert await conn.fetchval("SELECT count(*) FROM mirror.order_line_items") == 2000
    assert await conn.fetchval("SELECT count(*) FROM mirror.anomalies") == 0

    shown = progress.getvalue()
    assert "order: 2,000/2,000 objects, 8 pages" in shown
    assert "warehouse_location: 180/180 objects, 3 pages" in shown
    assert "bill: 0 objects" in shown and "unsupported" in shown


async def test_rerun_adds_nothing_and_since_repeats_its_filter_on_every_page(
        fake: FakeTrackstar, conn: asyncpg.Connection) -> None:
    populate(fake, orders=60, products=20)
    first = await run_backfill(conn, fake, resources=["order", "product"], page_size=25)
    assert sum(r.appended for r in first) == 80
    before = await log_of(conn)

    again = await run_backfill(conn, fake, resources=["order", "product"], page_size=25)
    assert [(r.objects, r.appended) for r in again] == [(20, 0), (60, 0)]
    assert await log_of(conn) == before

    # Five orders change after T; --since T fetches only them, filter repeated on every page.
    since = BASE + timedelta(days=1)
    for i in (3, 14, 15, 40, 59):
        obj = dict(fake.listed(CONN, PATHS["order"])[f"ord_{i:05d}"])
        obj.update(status="picked", updated_date=iso(since + timedelta(minutes=i)))
        fake.put(CONN, PATHS["order"], obj)
    mark = len(fake.requests)
    changed = await run_backfill(conn, fake, resources=["order"], since=since, page_size=2)
    assert [(r.objects, r.appended, r.pages) for r in changed] == [(5, 5, 3)]
    pages = fake.served()[mark:]
    assert [r.status for r in pages] == [200, 200, 200]
    assert all(r.query.get("updated_date[gte]") == "2025-03-02T08:00:00Z" for r in pages)
    assert ["page_token" in r.query for r in pages] == [False, True, True]
    assert await conn.fetchval(
        "SELECT count(*) FROM mirror.events WHERE data->>'status' = 'picked'") == 5
    # The completed --since walk is its own scope; the unfiltered one stays finished.
    scopes = await conn.fetch("SELECT endpoint, filters, pages, finished_at IS NOT NULL AS done "
                              "FROM mirror.backfill_progress ORDER BY endpoint, filters")
    assert [(s["endpoint"], s["filters"], s["pages"], s["done"]) for s in scopes] == [
        ("/wms/orders", "", 3, True),
        ("/wms/orders", "updated_date[gte]=2025-03-02T08:00:00Z", 3, True),
        ("/wms/products", "", 1, True)]


async def test_interrupted_backfill_resumes_to_the_same_log(
        fake: FakeTrackstar, db_url: str, other_db_url: str) -> None:
    populate(fake, orders=600, products=200)
    pages_of = {"/wms/products": 4, "/wms/orders": 12}          # at 50 per page
    enough = asyncio.Event()
    fake.on_request = lambda _: enough.set() if len(fake.served()) >= 7 else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "backfill", "--connection-id", CONN,
        "--resource", "order", "--resource", "product", "--page-size", "50",
        env=cli_env(db_url, fake), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    await asyncio.wait_for(enough.wait(), 30)
    proc.kill()                                                  # a crash, mid-page
    _, err = await proc.communicate()
    fake.on_request = None

    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    try:
        rows = await conn.fetch("SELECT endpoint, pages, objects, finished_at IS NOT NULL AS done"
                                " FROM mirror.backfill_progress")
        committed = await conn.fetchval("SELECT count(*) FROM mirror.events")
        assert 0 < committed < 800
        # A page's events and its progress row commit together, or neither does.
        assert committed == sum(r["objects"] for r in rows)
        unfinished = [r for r in rows if not r["done"]]
        assert unfinished and all(r["pages"] > 0 for r in unfinished)

        mark = len(fake.requests)
        results = await run_backfill(conn, fake, resources=["order", "product"], page_size=50)
        assert sum(r.resumed_pages for r in results) == sum(r["pages"] for r in unfinished)
        refetched = {endpoint: pages for endpoint, pages in pages_of.items()}
        for r in unfinished:                  # committed pages are not fetched again
            refetched[r["endpoint"]] -= r["pages"]
        assert len(fake.served()[mark:]) == sum(refetched.values())
        resumed_log = await log_of(conn)
    finally:
        await conn.close()

    other = await asyncpg.connect(other_db_url)
    await init_connection(other)
    try:
        await run_backfill(other, fake, resources=["order", "product"], page_size=50)
        assert await log_of(other) == resumed_log
        assert len(resumed_log) == 800
    finally:
        await other.close()
    text = err.decode()
    assert "product: 200/200 objects, 4 pages" in text
    assert TOKEN not in text and API_KEY not in text


async def test_a_crash_inside_a_page_commits_neither_its_events_nor_its_progress(
        fake: FakeTrackstar, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(fake, orders=100)
    real_insert = backfill_module.insert_records
    calls = 0

    async def insert_then_die(c: asyncpg.Connection, records: list[Any]) -> set[str]:
        nonlocal calls
        calls += 1
        new = await real_insert(c, records)
        if calls == 3:                       # the third page's rows are written, then: crash
            raise ConnectionResetError("simulated crash")
        return new

    monkeypatch.setattr(backfill_module, "insert_records", insert_then_die)
    with pytest.raises(ConnectionResetError):
        await run_backfill(conn, fake, resources=["order"], page_size=20)
    progress = await conn.fetchrow("SELECT pages, objects FROM mirror.backfill_progress")
    assert (progress["pages"], progress["objects"]) == (2, 40)
    assert await conn.fetchval("SELECT count(*) FROM mirror.events") == 40

    monkeypatch.setattr(backfill_module, "insert_records", real_insert)
    results = await run_backfill(conn, fake, resources=["order"], page_size=20)
    assert [(r.resumed_pages, r.pages, r.appended) for r in results] == [(2, 3, 60)]
    assert await conn.fetchval("SELECT count(DISTINCT object_id) FROM mirror.events") == 100


async def test_rate_limit_answers_wait_for_retry_after(
        fake: FakeTrackstar, conn: asyncpg.Connection) -> None:
    fake.rate_limit, fake.window, fake.retry_after = 4, 0.5, "1"
    populate(fake, products=240)
    results = await run_backfill(conn, fake, resources=["product"], page_size=20, rate=1000)
    assert results[0].appended == 240
    served = fake.served()
    limited = [i for i, r in enumerate(served) if r.status == 429]
    assert len(limited) >= 2
    for i in limited:                        # the next request came retry-after (1 s) later
        assert served[i + 1].at - served[i].at >= 1.0
    assert [r.status for r in served].count(200) == 12


async def test_client_paces_itself_under_ten_requests_per_second(
        fake: FakeTrackstar, conn: asyncpg.Connection) -> None:
    fake.rate_limit, fake.window = 10, 1.0   # Trackstar's limit, as a sliding window
    populate(fake, products=180)
    results = await run_backfill(conn, fake, resources=["product"], page_size=10, rate=10.0)
    assert results[0].appended == 180
    served = fake.served()
    assert [r.status for r in served] == [200] * 18
    times = [r.at for r in served]
    assert all(later - earlier >= 1.0 for earlier, later in zip(times, times[10:], strict=False))


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("0.25") == 0.25
    assert retry_after_seconds("Sat, 01 Mar 2025 12:00:07 GMT", now) == 7.0
    assert retry_after_seconds("Sat, 01 Mar 2025 11:00:00 GMT", now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_progress_line_counts_this_runs_rate_and_eta() -> None:
    now = [100.0]
    stream = io.StringIO()
    bar = Progress(stream, "order", clock=lambda: now[0], interval=5.0)
    bar.start(objects=1000, pages=1, total=None)        # committed before an interruption
    now[0] += 2.0
    bar.update(objects=1400, pages=3, total=5400)       # 400 objects in 2 s: 200/s
    now[0] += 1.0
    bar.update(objects=1600, pages=4, total=5400)       # not due yet: no new line
    bar.finish("done")
    assert stream.getvalue().splitlines() == [
        "order: 1,400/5,400 objects, 3 pages, 200/s, ETA 0:00:20, elapsed 0:00:02",
        "order: 1,600/5,400 objects, 4 pages, 200/s, done, elapsed 0:00:03"]


async def test_backfilled_object_then_webhooks_have_the_right_history_and_as_of(
        fake: FakeTrackstar, conn: asyncpg.Connection) -> None:
    populate(fake, orders=3)
    await run_backfill(conn, fake, resources=["order"])
    await project_all(conn)
    snap = fake.listed(CONN, PATHS["order"])["ord_00001"]
    t1 = BASE + timedelta(minutes=1)
    assert snap["updated_date"] == iso(t1)

    received = datetime.now(UTC) + timedelta(seconds=5)
    t2 = t1 + timedelta(hours=2)
    update = envelope("order.updated", {**snap, "status": "picked", "updated_date": iso(t2)},
                      connection_id=CONN, previous={"status": "open", "updated_date": iso(t1)})
    late_create = envelope("order.created", {**snap, "updated_date": at(-30)},
                           connection_id=CONN)
    await append(conn, record(update, received_at=received), record(late_create))
    await project_all(conn)

    history = await object_history(conn, "order", "ord_00001")
    assert [(h["valid_from"], h["data"]["status"], h["event_id"].split("_")[0], h["derived"])
            for h in history] == [
        (iso(BASE - timedelta(minutes=30)).replace("Z", "+00:00"), "open", "msg", False),
        (iso(t1).replace("Z", "+00:00"), "open", "backfill", False),
        (iso(t2).replace("Z", "+00:00"), "picked", "msg", False)]
    assert await conn.fetchval("SELECT count(*) FROM mirror.anomalies") == 0
    assert await conn.fetchval("SELECT status FROM mirror.orders WHERE id = 'ord_00001'") \
        == "picked"
    changes = await conn.fetch("SELECT path, old_value, new_value FROM mirror.changes "
                               "WHERE id = 'ord_00001' ORDER BY changed_at, path")
    assert [(c["path"], c["old_value"], c["new_value"]) for c in changes][-2:] == [
        ("status", "open", "picked"), ("updated_date", iso(t1), iso(t2))]

    async def state(when: datetime, known_at: datetime | None = None) -> Any:
        _, data = await object_as_of(conn, "order", "ord_00001", when, CONN, known_at)
        return data and data["status"]

    assert await state(t1 - timedelta(hours=1)) is None
    assert await state(t1 + timedelta(minutes=1)) == "open"
    assert await state(t2) == "picked"
    assert await state(t2, known_at=received - timedelta(seconds=1)) == "open"

    # A later backfill of the (stale) API listing adds nothing and never rolls it back.
    again = await run_backfill(conn, fake, resources=["order"])
    assert again[0].appended == 0
    await project_all(conn)
    assert await conn.fetchval("SELECT status FROM mirror.orders WHERE id = 'ord_00001'") \
        == "picked"


# ---------------------------------------------------------------------------------------------
# Reconcile
# ---------------------------------------------------------------------------------------------
async def test_reconcile_reports_injected_drift_and_repair_fixes_it(
        fake: FakeTrackstar, conn: asyncpg.Connection, db_url: str) -> None:
    populate(fake, orders=40, inventory=20)
    await run_backfill(conn, fake, resources=["order", "inventory"])
    await project_all(conn)
    async with client_for(fake) as client:
        clean = await reconcile(conn, client, CONN, resources=["order", "inventory"])
    assert [(r.resource, r.api_objects, r.mirror_objects, r.drifts) for r in clean] == [
        ("inventory", 20, 20, []), ("order", 40, 40, [])]

    orders = fake.listed(CONN, PATHS["order"])
    # A webhook that never arrived: the API moved on.
    fake.put(CONN, PATHS["order"], {**orders["ord_00005"], "status": "shipped",
                                    "updated_date": at(900)})
    # An order created while nothing listened, one the API no longer lists.
    fake.put(CONN, PATHS["order"], {**orders["ord_00001"], "id": "ord_new", "updated_date": at(5)})
    fake.remove(CONN, PATHS["order"], "ord_00007")
    # A change the WMS made without touching updated_date.
    item = fake.listed(CONN, PATHS["inventory"])["inv_00003"]
    fake.put(CONN, PATHS["inventory"], {**item, "onhand": 999,
                                        "locations": [{**item["locations"][0], "quantity": 999}]})
    # The mirror is ahead of a stale listing: a newer webhook arrived.
    await append(conn, envelope("order.updated", {**orders["ord_00009"], "status": "packed",
                                                  "updated_date": at(1000)},
                                connection_id=CONN, previous={"status": "open"}))
    await project_all(conn)

    async with client_for(fake) as client:
        reports = await reconcile(conn, client, CONN, resources=["order", "inventory"])
    found = {(r.resource, d.object_id): d for r in reports for d in r.drifts}
    assert {key: d.kind for key, d in found.items()} == {
        ("order", "ord_00005"): "differs", ("order", "ord_new"): "missing_here",
        ("order", "ord_00007"): "missing_there", ("order", "ord_00009"): "differs",
        ("inventory", "inv_00003"): "differs"}
    assert [p for p, _, _ in found[("order", "ord_00005")].changes] == ["status", "updated_date"]
    assert found[("order", "ord_00005")].changes[0] == ("status", "open", "shipped")
    assert [p for p, _, _ in found[("inventory", "inv_00003")].changes] == \
        ["locations.0.quantity", "onhand"]
    assert not found[("order", "ord_00009")].repairable
    assert await conn.fetchval("SELECT count(*) FROM mirror.events "
                               "WHERE origin = 'reconcile'") == 0   # a report changes nothing

    code, out, err = await run_cli(db_url, fake, "reconcile", "--connection-id", CONN,
                                   "--resource", "order")
    assert code == 1
    assert "order: 40 in the API, 40 in the mirror: 4 drifted (1 missing here, " \
        "1 missing there, 2 differs)" in out
    assert 'differs       ord_00005  status: "open" -> "shipped"' in out
    assert TOKEN not in out + err

    async with client_for(fake) as client:
        repaired = await reconcile(conn, client, CONN, resources=["order", "inventory"],
                                   repair=True)
    assert sorted(d.object_id for r in repaired for d in r.drifts if d.repaired) == \
        ["inv_00003", "ord_00005", "ord_00007", "ord_new"]
    repairs = await conn.fetch("SELECT event_id, object_id, event_type, data FROM mirror.events "
                               "WHERE origin = 'reconcile' ORDER BY object_id")
    assert [(r["object_id"], r["event_type"]) for r in repairs] == [
        ("inv_00003", "inventory.updated"), ("ord_00005", "order.updated"),
        ("ord_00007", "order.deleted"), ("ord_new", "order.updated")]
    assert all(ksuid_time(r["event_id"]) is not None for r in repairs)
    deleted_at = parse_time(repairs[2]["data"]["deleted_date"])
    assert deleted_at is not None and abs(deleted_at - datetime.now(UTC)) < timedelta(minutes=1)
    drift = await conn.fetch("SELECT object_id, resolved_at IS NOT NULL AS resolved, paths, "
                             "detail->>'drift' AS what FROM mirror.anomalies "
                             "WHERE kind = 'drift' ORDER BY object_id")
    assert [(d["object_id"], d["what"], d["resolved"]) for d in drift] == [
        ("inv_00003", "differs", True), ("ord_00005", "differs", True),
        ("ord_00007", "missing_there", True), ("ord_00009", "differs", False),
        ("ord_new", "missing_here", True)]
    assert drift[0]["paths"] == ["locations.0.quantity", "onhand"]

    await project_all(conn)
    async with client_for(fake) as client:
        after = await reconcile(conn, client, CONN, resources=["order", "inventory"])
    assert {(r.resource, d.object_id, d.kind) for r in after for d in r.drifts} == {
        ("order", "ord_00009", "differs")}
    assert (await current_state(conn, "inventory"))["inv_00003"]["onhand"] == 999
    assert (await current_state(conn, "order"))["ord_new"] == \
        fake.listed(CONN, PATHS["order"])["ord_new"]
    assert await conn.fetchval("SELECT status FROM mirror.orders WHERE id = 'ord_00005'") == \
        "shipped"
    # The deleted order left current state; its history stays, ending in the deletion.
    assert "ord_00007" not in await current_state(conn, "order")
    history = await object_history(conn, "order", "ord_00007")
    assert history[-1]["data"] is None and history[-1]["event_type"] == "order.deleted"
    assert parse_time(history[-1]["valid_from"]) == deleted_at and history[-2]["data"]["id"] == "ord_00007"
    assert (await object_as_of(conn, "order", "ord_00007", datetime.now(UTC)))[1] is None
    assert (await object_as_of(conn, "order", "ord_00007",
                               deleted_at - timedelta(seconds=1)))[1] is not None


async def test_reconcile_deletes_only_after_a_complete_listing(
        fake: FakeTrackstar, conn: asyncpg.Connection, db_url: str) -> None:
    populate(fake, orders=30)
    await run_backfill(conn, fake, resources=["order"])
    await project_all(conn)
    fake.remove(CONN, PATHS["order"], "ord_00003")
    fake.remove(CONN, PATHS["order"], "ord_00025")
    gone = ("order.deleted",)

    # The listing fails midway: its third page keeps answering 503, through every retry.
    fake.broken_from = 20
    async with client_for(fake) as client:
        failed = await reconcile(conn, client, CONN, resources=["order"], repair=True,
                                 page_size=10)
    assert [(r.status, r.drifts) for r in failed] == [("failed", [])]
    assert "the listing failed" in failed[0].message and "503" in failed[0].message
    code, out, _ = await run_cli(db_url, fake, "reconcile", "--connection-id", CONN,
                                 "--resource", "order", "--repair", "--page-size", "10")
    assert code == 1 and "order: FAILED: the listing failed, nothing compared or repaired" in out
    assert await conn.fetchval("SELECT count(*) FROM mirror.events "
                               "WHERE origin = 'reconcile'") == 0

    # The listing ends early: its pages stop five objects short of the total_count it gives.
    fake.broken_from = None
    fake.short_by = 5
    async with client_for(fake) as client:
        short = await reconcile(conn, client, CONN, resources=["order"], repair=True,
                                page_size=10)
    assert short[0].status == "incomplete" and "23 of the 28" in short[0].message
    missing = [d for d in short[0].drifts if d.kind == "missing_there"]
    assert {d.object_id for d in missing} >= {"ord_00003", "ord_00025"}
    assert not any(d.repaired for d in missing)
    assert all("cut short" in d.reason for d in missing)
    assert await conn.fetchval("SELECT count(*) FROM mirror.events WHERE event_type = ANY($1)",
                               list(gone)) == 0
    await project_all(conn)
    assert len(await current_state(conn, "order")) == 30

    # A complete listing: exactly the two objects the API no longer lists are deleted.
    fake.short_by = 0
    code, out, err = await run_cli(db_url, fake, "reconcile", "--connection-id", CONN,
                                   "--resource", "order", "--repair", "--page-size", "10")
    assert code == 0, out + err
    assert "missing there ord_00003  [deleted]" in out
    deleted = await conn.fetch("SELECT object_id FROM mirror.events WHERE event_type = ANY($1) "
                               "ORDER BY object_id", list(gone))
    assert [r["object_id"] for r in deleted] == ["ord_00003", "ord_00025"]
    await project_all(conn)
    assert set(await current_state(conn, "order")) == set(fake.listed(CONN, PATHS["order"]))
    assert len(await object_history(conn, "order", "ord_00003")) == 2
    assert await conn.fetchval("SELECT count(*) FROM mirror.anomalies WHERE kind = 'drift' "
                               "AND detail->>'repair' = 'deleted' AND resolved_at IS NOT NULL") == 2


# ---------------------------------------------------------------------------------------------
# Truncated deliveries
# ---------------------------------------------------------------------------------------------
async def test_fetch_truncated_completes_stubs_with_the_api_key_only_where_it_belongs(
        fake: FakeTrackstar, conn: asyncpg.Connection) -> None:
    full = {"id": "ord_t1", "status": "picked", "order_number": "SO-T1",
            "created_date": at(0), "updated_date": at(60), "line_items": [], "shipments": []}
    created = envelope("order.created", {**full, "status": "open", "updated_date": at(0)},
                       connection_id=CONN)
    stub = envelope("order.updated", {"id": "ord_t1"}, connection_id=CONN,
                    previous={"status": "open", "updated_date": at(0)}, data_truncated=True,
                    data_url=fake.data_url("evt_1"))
    fake.events["evt_1"] = {**stub, "data": full, "data_truncated": False}
    # The second answers with a short-lived link to the object.
    other = {"id": "inv_t2", "sku": "SKU-T2", "onhand": 4, "updated_date": at(10)}
    stub2 = envelope("inventory.updated", {"id": "inv_t2"}, connection_id=CONN,
                     data_truncated=True, data_url=fake.data_url("evt_2"))
    fake.events["evt_2"] = {"url": f"{fake.url}/signed/evt_2?sig=ok"}
    fake.signed["evt_2"] = other
    # The third points somewhere else: the API key must not go there.
    stub3 = envelope("order.updated", {"id": "ord_t3"}, connection_id=CONN,
                     data_truncated=True, data_url="http://127.0.0.2:9/events/evt_3")
    records = await append(conn, created, stub, stub2, stub3)
    await project_all(conn)
    assert await conn.fetchval("SELECT status FROM mirror.orders WHERE id = 'ord_t1'") == "open"

    async with client_for(fake) as client:
        results = await fetch_truncated(conn, client)
    assert [(r.event_id, r.status) for r in results] == [
        (records[1].event_id, "fetched"), (records[2].event_id, "fetched"),
        (records[3].event_id, "failed")]
    assert "not on the Trackstar API host" in results[2].message
    signed = [r for r in fake.requests if r.path.startswith("/signed/")]
    assert len(signed) == 1 and not signed[0].api_key_sent
    fetched = await conn.fetch("SELECT event_id, origin, unusable_reason FROM mirror.events "
                               "WHERE origin = 'fetch' ORDER BY event_id")
    assert sorted(r["event_id"] for r in fetched) == sorted(
        ["fetch_" + records[1].event_id, "fetch_" + records[2].event_id])
    assert all(r["unusable_reason"] is None for r in fetched)

    await project_all(conn)
    assert await current_state(conn, "order") == {"ord_t1": full}
    assert await current_state(conn, "inventory") == {"inv_t2": other}
    history = await object_history(conn, "order", "ord_t1")
    assert [(h["data"]["status"], h["event_id"]) for h in history] == \
        [("open", records[0].event_id), ("picked", "fetch_" + records[1].event_id)]

    async with client_for(fake) as client:
        again = await fetch_truncated(conn, client)
    assert [(r.event_id, r.status) for r in again] == [(records[3].event_id, "failed")]


# ---------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------
async def _everything_stored(conn: asyncpg.Connection) -> str:
    """Every value of every table in the mirror schema, as text (bytea decoded)."""
    tables = await conn.fetch("SELECT table_name FROM information_schema.tables "
                              "WHERE table_schema = 'mirror' AND table_type = 'BASE TABLE'")
    parts: list[str] = []
    for table in tables:
        for row in await conn.fetch(f'SELECT * FROM mirror."{table["table_name"]}"'):
            for value in row.values():
                if isinstance(value, bytes):
                    parts.append(value.decode("utf-8", errors="replace"))
                else:
                    parts.append(str(value))
    return "\n".join(parts)


async def test_credentials_reach_no_table_and_no_log_line(
        fake: FakeTrackstar, conn: asyncpg.Connection, db_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    populate(fake, orders=30, warehouses=1, locations=3)
    # A WMS that echoes credentials inside an object: redaction must catch them.
    leaky = {**fake.listed(CONN, PATHS["order"])["ord_00002"], "additional_fields": {
        "access_token": TOKEN, "integration": {"api_key": API_KEY}}}
    fake.put(CONN, PATHS["order"], leaky)
    fake.error_every = 4
    fake.rate_limit, fake.window, fake.retry_after = 6, 0.3, "0.3"
    stub = envelope("order.updated", {"id": "ord_00004"}, connection_id=CONN,
                    data_truncated=True, data_url=fake.data_url("evt_9"))
    fake.events["evt_9"] = {"id": "ord_00004", "status": "packed", "updated_date": at(800)}
    await append(conn, stub, envelope("order.created", {"id": "marker_1", "note": "MARKER-71"},
                                      connection_id=CONN))
    caplog.set_level(logging.DEBUG)

    progress = io.StringIO()
    await run_backfill(conn, fake, page_size=7, progress=progress)
    async with client_for(fake) as client:
        await fetch_truncated(conn, client)
    await project_all(conn)
    fake.put(CONN, PATHS["order"], {**leaky, "status": "shipped", "updated_date": at(999)})
    async with client_for(fake) as client:
        await reconcile(conn, client, CONN, repair=True)
    await project_all(conn)
    code, out, err = await run_cli(db_url, fake, "backfill", "--connection-id", CONN,
                                   "--resource", "order", "--page-size", "10")
    assert code == 0, err

    assert 429 in [r.status for r in fake.served()] and 503 in [r.status for r in fake.served()]
    assert all(r.token == TOKEN for r in fake.served())          # it was sent, every time
    stored = await _everything_stored(conn)
    assert "MARKER-71" in stored                                 # the scan sees everything
    assert await conn.fetchval("SELECT count(*) FROM mirror.events WHERE origin = 'reconcile'")
    leaked = await conn.fetchval(
        "SELECT data->'additional_fields' FROM mirror.orders WHERE id = 'ord_00002'")
    assert leaked == {"access_token": "[redacted]", "integration": {"api_key": "[redacted]"}}
    for secret in (TOKEN, API_KEY):
        assert secret not in stored
        assert secret not in caplog.text
        assert secret not in progress.getvalue()
        assert secret not in out + err
    assert "order: 30/30 objects" in err                         # progress went to stderr
    assert repr(ApiSettings(fake.url, API_KEY, TOKEN)).count("tok_") == 0
