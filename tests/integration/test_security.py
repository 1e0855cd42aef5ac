"""The read API's defences: the bearer token compared in constant time, and hostile resource
names, ids and parameters answered 400/404 without ever reaching SQL as SQL."""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from mirror.db import init_connection
from tests.conftest import API_TOKEN
from tests.logtools import append, project_all
from tests.signing import envelope

Client = TestClient[Any, Any]
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def _seed(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    try:
        await append(conn, envelope("order.created", {
            "id": "ord_1", "status": "open", "updated_date": "2025-01-01T10:00:00Z"}))
        await project_all(conn)
    finally:
        await conn.close()


async def _log_intact(db_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(db_url)
    try:
        return (await conn.fetchval("SELECT count(*) FROM mirror.events"),
                await conn.fetchval("SELECT count(*) FROM mirror.orders"))
    finally:
        await conn.close()


def _flip(text: str, index: int) -> str:
    return text[:index] + ("y" if text[index] != "y" else "z") + text[index + 1 :]


async def test_bearer_token_is_compared_in_constant_time_whatever_is_sent(
        client: Client, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await _seed(db_url)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    wrong = {
        "shorter": API_TOKEN[:-1],
        "longer": API_TOKEN + "x",
        "empty": "",
        "first char wrong": _flip(API_TOKEN, 0),
        "last char wrong": _flip(API_TOKEN, len(API_TOKEN) - 1),
        "not UTF-8": "\udcff" * len(API_TOKEN),
    }
    for label, token in wrong.items():
        compared.clear()
        header = b"Bearer " + token.encode("utf-8", "surrogateescape")
        response = await client.get("/objects/order/ord_1",
                                    headers={"Authorization": header.decode("latin-1")})
        assert response.status == 401, label
        assert response.headers["WWW-Authenticate"] == "Bearer"
        text = await response.text()
        assert "open" not in text and API_TOKEN not in text
        # Every wrong token, whatever its length, goes through the one constant-time
        # comparison against the whole expected token: no early exit reveals a prefix.
        assert len(compared) == 1, label
        assert compared[0][1] == API_TOKEN.encode(), label
    for header in ({}, {"Authorization": API_TOKEN}, {"Authorization": f"Basic {API_TOKEN}"}):
        assert (await client.get("/objects/order/ord_1", headers=header)).status == 401
    compared.clear()
    ok = await client.get("/objects/order/ord_1", headers={"Authorization": f"bearer {API_TOKEN}"})
    assert ok.status == 200 and (await ok.json())["data"]["status"] == "open"
    assert len(compared) == 1


async def test_every_reading_route_needs_the_token_for_get_and_head(client: Client,
                                                                    db_url: str) -> None:
    """The token is checked by one middleware for every route that reads data, whatever the
    method aiohttp adds beside GET: a HEAD answered 200 or 404 would tell who exists."""
    await _seed(db_url)
    paths = ["/objects/order/ord_1", "/objects/order/ord_1/history", "/explore/resources",
             "/explore/search?q=ord", "/explore/timeline?resource=order&id=ord_1",
             "/explore/state?resource=order&id=ord_1", "/explore/overview"]
    wrong = {"Authorization": "Bearer " + _flip(API_TOKEN, 3)}
    right = {"Authorization": f"Bearer {API_TOKEN}"}
    for path in paths:
        for method in ("GET", "HEAD"):
            for headers in ({}, wrong):
                response = await client.request(method, path, headers=headers)
                assert response.status == 401, (method, path, headers)
            assert (await client.request(method, path, headers=right)).status == 200, path
    # The page itself holds no data and needs no token.
    assert (await client.get("/ui/")).status == 200
    assert (await client.get("/healthz")).status == 200


INJECTIONS = [
    "x'; DROP TABLE mirror.events; --",
    "' OR '1'='1",
    "ord_1' --",
    '"; DELETE FROM mirror.orders; --',
    "%", "_", "ord%", "ord__", "*", "\\", "$1", "ord_1\\",
    "ордер-🧨", "ord_1\u200b",
    "a" * 2048,
]


@pytest.mark.parametrize("path", ["/objects/order/{}", "/objects/order/{}/history"])
async def test_injection_strings_in_ids_are_just_ids(client: Client, db_url: str,
                                                     path: str) -> None:
    await _seed(db_url)
    for object_id in INJECTIONS:
        response = await client.get(path.format(quote(object_id, safe="")), headers=AUTH)
        # No wildcard matched ord_1, no quote ended a literal: it is an id nobody has.
        assert response.status == 404, (object_id, await response.text())
    for object_id, status in (("a" * 2049, 400), ("\x00", 400), ("ord\x00_1", 400)):
        response = await client.get(path.format(quote(object_id, safe="")), headers=AUTH)
        assert response.status == status, object_id
    assert await _log_intact(db_url) == (1, 1)


async def test_injection_strings_in_resources_and_parameters_are_refused(
        client: Client, db_url: str) -> None:
    await _seed(db_url)
    for resource in ["order'; DROP TABLE mirror.events; --", "orders", "%", "order%",
                     "events", "mirror.events", "pg_catalog.pg_user", "ORDER;", "🧨"]:
        response = await client.get(f"/objects/{quote(resource, safe='')}/ord_1", headers=AUTH)
        assert response.status == 400, resource
        assert "unknown resource" in (await response.json())["error"]
    # Spellings of a real resource are that resource.
    for resource in ("ORDER", "Order", " order"):
        response = await client.get(f"/objects/{quote(resource, safe='')}/ord_1", headers=AUTH)
        assert response.status == 200, resource
    for params, status in [
        ({"connection_id": "' OR '1'='1"}, 404),
        ({"connection_id": "%"}, 404),
        ({"connection_id": "conn_1' --"}, 404),
        ({"connection_id": "conn\x00"}, 400),
        ({"connection_id": "c" * 3000}, 400),
        ({"at": "2025-01-01'; DROP TABLE mirror.events; --"}, 400),
        ({"at": "now()"}, 400),
        ({"known_at": "' OR 1=1 --"}, 400),
        ({"at": "9999-12-31T23:59:59-14:00"}, 400),
    ]:
        response = await client.get("/objects/order/ord_1", params=params, headers=AUTH)
        assert response.status == status, params
    assert await _log_intact(db_url) == (1, 1)


async def test_the_event_log_refuses_update_delete_and_truncate(db_url: str) -> None:
    await _seed(db_url)
    conn = await asyncpg.connect(db_url)
    try:
        for statement in ("UPDATE mirror.events SET event_type = 'forged'",
                          "DELETE FROM mirror.events",
                          "TRUNCATE mirror.events",
                          "TRUNCATE mirror.events CASCADE"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
        assert await conn.fetchval("SELECT event_type FROM mirror.events") == "order.created"
    finally:
        await conn.close()
