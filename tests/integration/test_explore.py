"""The history explorer's JSON endpoints (/explore/*) and its page (/ui/), against a real
database: search, timelines with changes and anomalies, states as of and known at, the overview,
and their defences (token, hostile input)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from mirror.db import init_connection
from tests.conftest import API_TOKEN
from tests.logtools import append, project_all, record
from tests.signing import envelope

Client = TestClient[Any, Any]
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
ENDPOINTS = ["/explore/resources", "/explore/search", "/explore/timeline", "/explore/state",
             "/explore/overview"]


def order(status: str, minute: int, previous: dict[str, Any] | None = None,
          order_id: str = "ord_1234") -> dict[str, Any]:
    return envelope("order.updated" if previous else "order.created",
                    {"id": order_id, "order_number": "#1234", "status": status,
                     "updated_date": f"2025-05-01T10:{minute:02d}:00Z",
                     "line_items": [{"sku": "SKU-1", "quantity": 2}]}, previous=previous)


async def _seed(db_url: str) -> datetime:
    """An order created at 10:00, then an update at 10:09 whose previous_attributes reveal a
    state (picked, 10:05) whose own webhook never came: a derived version and a
    missed_webhook anomaly. Returns when the update was received."""
    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    try:
        first = datetime.now(UTC) - timedelta(minutes=2)
        await append(conn, record(order("open", 0), received_at=first))
        await append(conn, record(order("shipped", 9, {"status": "picked",
                                                       "updated_date": "2025-05-01T10:05:00Z"}),
                                  received_at=first + timedelta(minutes=1)))
        await append(conn, envelope("inventory.created", {
            "id": "inv_9", "sku": "WIDGET-RED", "onhand": 4,
            "updated_date": "2025-05-01T09:00:00Z"}))
        await project_all(conn)
        return first + timedelta(minutes=1)
    finally:
        await conn.close()


async def _get(client: Client, path: str, **params: str) -> tuple[int, Any]:
    response = await client.get(path, params=params, headers=AUTH)
    return response.status, await response.json()


async def test_timeline_marks_the_derived_version_and_shows_changes_and_anomalies(
        client: Client, db_url: str) -> None:
    received = await _seed(db_url)
    status, body = await _get(client, "/explore/timeline", resource="order", id="ord_1234")
    assert status == 200, body
    assert body["connection_id"] == "conn_1" and body["total"] == 3 and body["more"] is False
    versions = body["versions"]
    assert [(v["valid_from"][11:16], v["derived"]) for v in versions] == [
        ("10:09", False), ("10:05", True), ("10:00", False)]
    assert versions[0]["event_type"] == "order.updated"
    # The derived state was revealed by the 10:09 update: same event, received then.
    assert versions[1]["event_id"] == versions[0]["event_id"]
    assert datetime.fromisoformat(versions[1]["received_at"]) == received
    changes = {c["path"]: (c["old"], c["new"]) for c in versions[1]["changes"]}
    assert changes["status"] == ("open", "picked")
    changes = {c["path"]: (c["old"], c["new"]) for c in versions[0]["changes"]}
    assert changes["status"] == ("picked", "shipped")
    kinds = {(a["kind"], a["at"][11:16]) for a in body["anomalies"]}
    assert ("missed_webhook", "10:05") in kinds


async def test_timeline_pages_backwards(client: Client, db_url: str) -> None:
    await _seed(db_url)
    status, first = await _get(client, "/explore/timeline", resource="order", id="ord_1234",
                               limit="2")
    assert status == 200 and first["more"] is True and len(first["versions"]) == 2
    status, second = await _get(client, "/explore/timeline", resource="order", id="ord_1234",
                                limit="2", before=first["next_before"])
    assert status == 200 and second["more"] is False
    assert [v["valid_from"][11:16] for v in second["versions"]] == ["10:00"]
    assert second["versions"][0]["derived"] is False


async def test_state_as_of_and_known_at(client: Client, db_url: str) -> None:
    received = await _seed(db_url)
    at = "2025-05-01T10:06:00Z"
    status, body = await _get(client, "/explore/state", resource="order", id="ord_1234", at=at)
    assert status == 200 and body["data"]["status"] == "picked"
    # Before the update arrived the mirror knew nothing of 'picked'.
    before = (received - timedelta(seconds=1)).isoformat()
    status, body = await _get(client, "/explore/state", resource="order", id="ord_1234", at=at,
                              known_at=before)
    assert status == 200 and body["data"]["status"] == "open"
    status, body = await _get(client, "/explore/state", resource="order", id="ord_1234")
    assert status == 200 and body["data"]["status"] == "shipped"
    status, body = await _get(client, "/explore/state", resource="order", id="ord_1234",
                              at="2025-05-01T09:00:00Z")
    assert status == 404


async def test_search_by_id_prefix_order_number_and_sku(client: Client, db_url: str) -> None:
    await _seed(db_url)

    async def found(**params: str) -> list[tuple[str, str]]:
        status, body = await _get(client, "/explore/search", **params)
        assert status == 200, body
        return [(r["resource"], r["id"]) for r in body["results"]]

    assert await found(q="ord_12") == [("order", "ord_1234")]
    assert await found(q="#1234") == [("order", "ord_1234")]
    assert await found(q="1234", resource="order") == [("order", "ord_1234")]
    assert await found(q="widget-r") == [("inventory", "inv_9")]
    assert await found(q="widget", resource="order") == []
    assert await found(q="nothing-like-it") == []
    _, body = await _get(client, "/explore/search", q="ord_1234")
    assert body["results"][0]["label"] == "#1234" and body["results"][0]["status"] == "shipped"


async def test_a_deleted_object_with_a_slash_in_its_id_is_found_and_opened(
        client: Client, db_url: str) -> None:
    url = "https://wms.example/api/v1/orders?page=2"
    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    try:
        error = {"failed_url": url, "error_message": "timeout",
                 "created_date": "2025-05-01T08:00:00Z", "updated_date": "2025-05-01T08:00:00Z"}
        await append(conn, envelope("connection-error.created", error))
        await append(conn, envelope("connection-error.deleted",
                                    {**error, "deleted_date": "2025-05-01T09:00:00Z"}))
        await project_all(conn)
    finally:
        await conn.close()
    status, body = await _get(client, "/explore/search", q=url, resource="connection-error")
    assert status == 200
    assert [(r["id"], r["current"]) for r in body["results"]] == [(url, False)]
    status, body = await _get(client, "/explore/timeline", resource="connection_error", id=url)
    assert status == 200
    assert [v["deleted"] for v in body["versions"]] == [True, False]


async def test_overview_figures(client: Client, db_url: str) -> None:
    await _seed(db_url)
    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    try:
        await append(conn, envelope("order.teleported", {"id": "x"}))
        await conn.execute(
            "INSERT INTO mirror.poison (resource, connection_id, object_id, reason, "
            "last_position) VALUES ('order', 'conn_1', 'ord_bad', 'fold raised: boom', 1)")
        await conn.execute(
            "INSERT INTO mirror.backfill_progress (connection_id, endpoint, resource, pages, "
            "objects, appended, total_count) VALUES ('conn_1', '/wms/orders', 'order', 3, "
            "300, 120, 1000)")
    finally:
        await conn.close()
    status, body = await _get(client, "/explore/overview")
    assert status == 200, body
    assert body["log"]["events"] == 4 and body["log"]["unprojectable"] == 1
    assert body["log"]["bytes"] > 0
    minutes = body["ingest_per_minute"]
    assert len(minutes) == 60 and sum(m["events"] for m in minutes) == 4
    assert set(body["projection_lag"]) >= {"events", "seconds"}
    anomalies = body["open_anomalies"]["items"]
    assert {(a["resource"], a["id"], a["kind"]) for a in anomalies} >= {
        ("order", "ord_1234", "missed_webhook")}
    assert [(p["id"], p["reason"]) for p in body["poisoned"]["items"]] == [
        ("ord_bad", "fold raised: boom")]
    assert [u["event_type"] for u in body["unprojectable"]] == ["order.teleported"]
    assert [(b["endpoint"], b["objects"], b["total_count"], b["finished_at"])
            for b in body["backfills"]] == [("/wms/orders", 300, 1000, None)]


async def test_every_explore_endpoint_needs_the_token(client: Client, db_url: str) -> None:
    await _seed(db_url)
    params = {"q": "ord", "resource": "order", "id": "ord_1234"}
    for path in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {API_TOKEN}"},
                        {"Authorization": API_TOKEN}):
            response = await client.get(path, params=params, headers=headers)
            assert response.status == 401, (path, headers)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            text = await response.text()
            assert "ord_1234" not in text and "shipped" not in text
        # The token in the query string is not a token.
        response = await client.get(path, params={**params, "token": API_TOKEN})
        assert response.status == 401


HOSTILE = [
    "x'; DROP TABLE mirror.events; --", "' OR '1'='1", "ord_1234' --", '"; DELETE FROM x; --',
    "%", "_", "ord%", "ord__", "*", "\\", "$1", "$2", "::text", "ord_1234\\", ")) OR ((1=1",
    "ордер-🧨", "ord_1234\u200b", "#", "##", "a" * 512, "%00", "\x01\x02",
]


async def test_hostile_input_never_becomes_sql_nor_a_5xx(client: Client, db_url: str) -> None:
    await _seed(db_url)
    refused = ["a" * 513, "a" * 5000, "ord\x00", "\x00"]
    checks: list[tuple[str, dict[str, str]]] = []
    for text in [*HOSTILE, *refused]:
        checks += [
            ("/explore/search", {"q": text}),
            ("/explore/search", {"q": "ord", "resource": text}),
            ("/explore/search", {"q": "ord", "limit": text}),
            ("/explore/timeline", {"resource": "order", "id": text}),
            ("/explore/timeline", {"resource": text, "id": "ord_1234"}),
            ("/explore/timeline", {"resource": "order", "id": "ord_1234", "connection_id": text}),
            ("/explore/timeline", {"resource": "order", "id": "ord_1234", "before": text}),
            ("/explore/timeline", {"resource": "order", "id": "ord_1234", "limit": text}),
            ("/explore/state", {"resource": "order", "id": text}),
            ("/explore/state", {"resource": "order", "id": "ord_1234", "at": text}),
            ("/explore/state", {"resource": "order", "id": "ord_1234", "known_at": text}),
        ]
    for path, params in checks:
        response = await client.get(path, params=params, headers=AUTH)
        assert response.status < 500, (path, params, (await response.text())[:200])
        if response.status == 200 and path == "/explore/search":
            body = await response.json()
            # No wildcard or quote widened the match: only real prefixes find the order.
            for result in body["results"]:
                assert result["id"].lower().startswith(params["q"].lower()) or (
                    (result["label"] or "").lower().startswith(params["q"].lower().lstrip("#")))
        if path != "/explore/search" and params.get("id", "ord_1234") != "ord_1234":
            assert response.status in (400, 404), (path, params)
    for text in refused:
        response = await client.get("/explore/timeline", params={"resource": "order", "id": text},
                                    headers=AUTH)
        assert response.status == 400
    # Past the HTTP parser's limits the request never reaches a handler: still no 5xx.
    response = await client.get("/explore/search", params={"q": "a" * 100_000}, headers=AUTH)
    assert response.status == 400
    for limit in ("0", "-1", "1001", "1e3", "١٢", "99999999999"):
        response = await client.get("/explore/timeline", headers=AUTH,
                                    params={"resource": "order", "id": "ord_1234", "limit": limit})
        assert response.status == 400, limit
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM mirror.events") == 3
        assert await conn.fetchval("SELECT count(*) FROM mirror.orders") == 1
    finally:
        await conn.close()


async def test_the_page_is_served_without_data_and_with_a_strict_policy(client: Client) -> None:
    response = await client.get("/ui/")
    assert response.status == 200
    html = await response.text()
    assert response.headers["Content-Type"].startswith("text/html")
    assert "/ui/app.js" in html and "/ui/style.css" in html
    # Every asset from this origin: nothing from a CDN, no inline script.
    assert "http://" not in html and "https://" not in html
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = await client.get(f"/ui/{asset}")
        assert response.status == 200 and response.headers["Content-Type"].startswith(kind)
        assert "https://" not in await response.text()
    redirect = await client.get("/ui", allow_redirects=False)
    assert redirect.status == 301 and redirect.headers["Location"] == "/ui/"
    for path in ("/ui/../schema.sql", "/ui/%2e%2e%2fapi.py", "/ui/api.py", "/ui/history.sql",
                 "/ui/app.js%00", "/ui/.%2e/.%2e/etc/passwd"):
        response = await client.get(path)
        assert response.status == 404, path


async def test_an_object_with_a_thousand_versions_answers_within_300_ms(
        client: Client, db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    try:
        events = []
        for n in range(1000):
            at = start + timedelta(minutes=n)
            data = {"id": "ord_big", "status": f"s{n}", "order_number": "BIG",
                    "updated_date": at.isoformat(), "line_items": [{"sku": "A", "quantity": n}]}
            previous = None if n == 0 else {
                "status": f"s{n - 1}", "line_items.0.quantity": n - 1,
                "updated_date": (at - timedelta(minutes=1)).isoformat()}
            events.append(envelope("order.updated" if n else "order.created", data,
                                   previous=previous))
        await append(conn, *events)
        await project_all(conn)
    finally:
        await conn.close()
    timings = []
    for _ in range(3):
        began = time.perf_counter()
        status, body = await _get(client, "/explore/timeline", resource="order", id="ord_big")
        timings.append(time.perf_counter() - began)
        assert status == 200
    assert body["total"] == 1000 and len(body["versions"]) == 1000 and not body["more"]
    assert {c["path"] for c in body["versions"][0]["changes"]} >= {"status",
                                                                   "line_items.0.quantity"}
    assert min(timings) < 0.3, timings


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_unknown_objects_are_404_not_errors(client: Client, path: str) -> None:
    response = await client.get(path, params={"q": "zzz", "resource": "order", "id": "zzz"},
                                headers=AUTH)
    if path in ("/explore/timeline", "/explore/state"):
        assert response.status == 404
    else:
        assert response.status == 200
