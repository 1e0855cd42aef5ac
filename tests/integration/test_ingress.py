"""POST /webhooks against the real app and a real PostgreSQL: every row of the README's
"What the ingress answers" table."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirror.app import create_app
from mirror.sample import message_id
from tests.conftest import OTHER_SECRET, SECRET, make_settings
from tests.signing import envelope, signed

Client = TestClient[Any, Any]


def order(order_id: str = "ord_1", status: str = "open") -> dict[str, Any]:
    return envelope("order.created", {"id": order_id, "status": status,
                                      "updated_date": "2025-01-01T10:00:00Z"})


async def stored(db_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetch("SELECT * FROM mirror.events ORDER BY position")
    finally:
        await conn.close()


async def test_authentic_event_is_stored_once_and_answered_2xx(client: Client,
                                                                db_url: str) -> None:
    body, headers = signed(order())
    response = await client.post("/webhooks", data=body, headers=headers)
    assert response.status == 200
    assert (await response.json())["status"] == "stored"
    rows = await stored(db_url)
    assert len(rows) == 1
    row = rows[0]
    assert row["event_id"] == headers["svix-id"]
    assert row["event_type"] == "order.created"
    assert row["resource"] == "order" and row["object_id"] == "ord_1"
    assert row["connection_id"] == "conn_1" and row["integration_name"] == "sandbox"
    assert bytes(row["body"]) == body
    assert bytes(row["body_sha256"]) == hashlib.sha256(body).digest()
    assert row["unusable_reason"] is None


async def test_retry_with_same_svix_id_stores_nothing_new(client: Client, db_url: str) -> None:
    body, headers = signed(order())
    first = await client.post("/webhooks", data=body, headers=headers)
    # Svix re-signs every attempt with a new timestamp but the same id.
    body2, headers2 = signed(order(), msg_id=headers["svix-id"])
    second = await client.post("/webhooks", data=body2, headers=headers2)
    assert first.status == 200 and second.status == 200
    assert (await second.json())["status"] == "duplicate"
    assert len(await stored(db_url)) == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "body is not valid JSON"),
        (b"[1, 2, 3]", "body is not a JSON object"),
        (orjson.dumps({"connection_id": "c", "data": {"id": "x"}}), "missing or invalid event_type"),
        (orjson.dumps(envelope("inventory_ledger.created", {"id": "x"})), "unknown event_type"),
        (orjson.dumps(envelope("order.updated", {"id": "x"}, data_truncated=True,
                               data_url="https://example.invalid/e")), "data truncated"),
        (orjson.dumps({"event_type": "order.created", "connection_id": "c", "data": "zzz"}),
         "missing or invalid data"),
        (orjson.dumps(envelope("order.created", {"status": "open"})), "missing object key"),
        (b'{"event_type": "order.created", "data": {"id": "a\\u0000b"}}',
         "body cannot be stored as JSON"),
        (b'{"event_type": "order.created", "data": {"id": NaN}}', "body is not valid JSON"),
    ],
)
async def test_authentic_but_unusable_bodies_are_kept_and_flagged(
        client: Client, db_url: str, payload: bytes, reason: str) -> None:
    body, headers = signed(payload)
    response = await client.post("/webhooks", data=body, headers=headers)
    assert response.status == 200
    assert "not projectable" in (await response.json())["warning"]
    rows = await stored(db_url)
    assert len(rows) == 1
    assert rows[0]["unusable_reason"].startswith(reason)
    assert bytes(rows[0]["body"]) == payload


async def test_event_type_spellings_route_to_one_resource(client: Client, db_url: str) -> None:
    for spelling in ("inbound_shipment.updated", "Inbound-Shipment.Updated",
                     "shipping_method.created"):
        body, headers = signed(envelope(spelling, {"id": spelling}))
        assert (await client.post("/webhooks", data=body, headers=headers)).status == 200
    rows = await stored(db_url)
    assert [r["event_type"] for r in rows] == ["inbound_shipment.updated",
                                               "Inbound-Shipment.Updated",
                                               "shipping_method.created"]
    assert [r["resource"] for r in rows] == ["inbound_shipment", "inbound_shipment",
                                             "shipping_method"]


def _manual_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


async def _refused(client: Client, db_url: str, body: bytes, headers: dict[str, str],
                   fragment: str) -> None:
    response = await client.post("/webhooks", data=body, headers=headers)
    assert response.status == 401
    answer = await response.json()
    assert fragment in answer["error"]
    assert await stored(db_url) == []


async def test_missing_headers_are_refused(client: Client, db_url: str) -> None:
    body, headers = signed(order())
    for name in ("svix-id", "svix-timestamp", "svix-signature"):
        partial = {k: v for k, v in headers.items() if k != name}
        await _refused(client, db_url, body, partial, "missing")


async def test_garbage_signature_is_refused(client: Client, db_url: str) -> None:
    body, headers = signed(order())
    for garbage in ("garbage", "v1,", "v1,not-base64!!", "v2,abc", "v1,AAAA v1"):
        await _refused(client, db_url, body, {**headers, "svix-signature": garbage}, "signature")


async def test_wrong_secret_and_tampered_body_are_refused(client: Client, db_url: str) -> None:
    body, headers = signed(order(), secret="whsec_" + base64.b64encode(b"x" * 24).decode())
    await _refused(client, db_url, body, headers, "no matching signature")
    body, headers = signed(order())
    await _refused(client, db_url, body.replace(b"open", b"shut"), headers,
                   "no matching signature")


async def test_malformed_id_and_timestamp_headers_are_refused(client: Client,
                                                              db_url: str) -> None:
    body, headers = signed(order())
    await _refused(client, db_url, body, {**headers, "svix-timestamp": "yesterday"},
                   "svix-timestamp")
    await _refused(client, db_url, body, {**headers, "svix-id": "has space"}, "svix-id")


@pytest.mark.parametrize(("shift", "word"), [(-6, "too old"), (6, "too new")])
async def test_timestamp_six_minutes_off_is_refused(client: Client, db_url: str, shift: int,
                                                    word: str) -> None:
    at = datetime.now(UTC) + timedelta(minutes=shift)
    body, headers = signed(order(), at=at)
    await _refused(client, db_url, body, headers, word)


async def test_timestamp_four_minutes_off_is_accepted(client: Client, db_url: str) -> None:
    for shift in (-4, 4):
        body, headers = signed(order(f"o{shift}"), at=datetime.now(UTC) + timedelta(minutes=shift))
        assert (await client.post("/webhooks", data=body, headers=headers)).status == 200
    assert len(await stored(db_url)) == 2


async def test_non_utf8_body_is_refused(client: Client, db_url: str) -> None:
    body = b'{"event_type": "order.created", "data": {"id": "\xff\xfe"}}'
    msg = message_id()
    ts = int(datetime.now(UTC).timestamp())
    headers = {"svix-id": msg, "svix-timestamp": str(ts),
               "svix-signature": _manual_signature(SECRET, msg, ts, body)}
    await _refused(client, db_url, body, headers, "UTF-8")


async def test_webhook_header_spelling_is_accepted(client: Client, db_url: str) -> None:
    body, headers = signed(order())
    renamed = {k.replace("svix-", "webhook-"): v for k, v in headers.items()}
    assert (await client.post("/webhooks", data=body, headers=renamed)).status == 200
    assert [r["event_id"] for r in await stored(db_url)] == [headers["svix-id"]]


async def test_secret_rotation_accepts_either_secret(db_url: str) -> None:
    settings = make_settings(db_url, webhook_secrets=(SECRET, OTHER_SECRET))
    async with TestServer(create_app(settings, project=False), host="127.0.0.1") as server, \
            TestClient(server) as client:
        old_body, old_headers = signed(order("a"), secret=SECRET)
        new_body, new_headers = signed(order("b"), secret=OTHER_SECRET)
        assert (await client.post("/webhooks", data=old_body, headers=old_headers)).status == 200
        assert (await client.post("/webhooks", data=new_body, headers=new_headers)).status == 200
        # During rotation Svix sends both signatures in one header.
        both_body = orjson.dumps(order("c"))
        _, h1 = signed(both_body, secret=OTHER_SECRET)
        _, h2 = signed(both_body, secret=SECRET, msg_id=h1["svix-id"],
                       at=datetime.fromtimestamp(int(h1["svix-timestamp"]), tz=UTC))
        h1["svix-signature"] = "v1,AAAA " + h1["svix-signature"] + " " + h2["svix-signature"]
        assert (await client.post("/webhooks", data=both_body, headers=h1)).status == 200
    assert sorted(r["object_id"] for r in await stored(db_url)) == ["a", "b", "c"]


async def test_body_over_limit_is_413_and_not_stored(db_url: str) -> None:
    settings = make_settings(db_url, max_body_bytes=2048)
    async with TestServer(create_app(settings, project=False), host="127.0.0.1") as server, \
            TestClient(server) as client:
        big = envelope("order.created", {"id": "big", "note": "x" * 4096})
        body, headers = signed(big)
        response = await client.post("/webhooks", data=body, headers=headers)
        assert response.status == 413
        assert "larger" in (await response.json())["error"]

        async def chunks() -> Any:  # no Content-Length: the limit holds while streaming
            for start in range(0, len(body), 512):
                yield body[start : start + 512]

        response = await client.post("/webhooks", data=chunks(), headers=headers)
        assert response.status == 413
    assert await stored(db_url) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(client: Client, db_url: str, method: str) -> None:
    body, headers = signed(order())
    response = await client.request(method, "/webhooks", data=body, headers=headers)
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert "POST" in (await response.json())["error"]
    assert await stored(db_url) == []


async def test_database_unreachable_is_503_promptly(db_url: str) -> None:
    settings = make_settings("postgresql://postgres@127.0.0.1:1/nowhere", db_timeout=1.0)
    async with TestServer(create_app(settings, project=False), host="127.0.0.1") as server, \
            TestClient(server) as client:
        body, headers = signed(order())
        started = asyncio.get_running_loop().time()
        response = await client.post("/webhooks", data=body, headers=headers)
        assert response.status == 503
        assert response.headers["Retry-After"]
        assert asyncio.get_running_loop().time() - started < 5
        ready = await client.get("/readyz")
        assert ready.status == 503


async def test_two_hundred_concurrent_posts_are_all_stored(client: Client, db_url: str) -> None:
    requests = [signed(order(f"ord_{i}")) for i in range(200)]
    answers = await asyncio.gather(*(client.post("/webhooks", data=b, headers=h)
                                     for b, h in requests))
    assert [a.status for a in answers] == [200] * 200
    rows = await stored(db_url)
    assert sorted(r["event_id"] for r in rows) == sorted(h["svix-id"] for _, h in requests)


async def test_access_token_is_redacted_everywhere(client: Client, db_url: str) -> None:
    token = "tok_SUPER_DISTINCTIVE_7f3a9c"
    event = envelope("connection.created", {"created_date": "2025-01-01T00:00:00Z",
                                            "access_token": token})
    body, headers = signed(event)
    response = await client.post("/webhooks", data=body, headers=headers)
    assert response.status == 200
    assert token not in await response.text()
    # also inside a body that is not even JSON
    bad, bad_headers = signed('{"access_token": "' + token + '", oops')
    assert (await client.post("/webhooks", data=bad, headers=bad_headers)).status == 200
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT * FROM mirror.events ORDER BY position")
        assert bytes(rows[0]["body_sha256"]) == hashlib.sha256(body).digest()
        dump = await conn.fetchval(
            "SELECT string_agg(t::text, ' ') FROM ("
            " SELECT e::text AS t FROM mirror.events e"
            " UNION ALL SELECT convert_from(body, 'UTF8') FROM mirror.events) x")
        assert token not in dump
        assert "[redacted]" in dump
    finally:
        await conn.close()


async def test_over_long_object_key_is_stored_flagged_not_refused(client: Client,
                                                                  db_url: str) -> None:
    # Indexed keys have a byte limit in PostgreSQL; a long non-ASCII failed_url must not turn
    # into a 503 forever (Svix would give up and the event would be lost).
    event = envelope("connection-error.created", {"failed_url": "https://wms/" + "é" * 1500})
    body, headers = signed(event)
    response = await client.post("/webhooks", data=body, headers=headers)
    assert response.status == 200
    rows = await stored(db_url)
    assert len(rows) == 1 and rows[0]["unusable_reason"].startswith("missing object key")
    assert bytes(rows[0]["body"]) == body


async def test_row_the_database_refuses_is_kept_as_its_body(client: Client,
                                                            db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:  # a constraint a user (or a future limit) might impose on the parsed columns
        await conn.execute("ALTER TABLE mirror.events ADD CONSTRAINT no_refuse "
                           "CHECK (connection_id IS DISTINCT FROM 'refuse_me')")
    finally:
        await conn.close()
    body, headers = signed(envelope("order.created", {"id": "o1"}, connection_id="refuse_me"))
    response = await client.post("/webhooks", data=body, headers=headers)
    assert response.status == 200
    rows = await stored(db_url)
    assert len(rows) == 1 and rows[0]["connection_id"] == ""
    assert rows[0]["unusable_reason"].startswith("database refused the parsed row (23514)")
    assert bytes(rows[0]["body"]) == body


async def test_credential_text_redaction_cannot_miss_is_withheld(client: Client,
                                                                 db_url: str) -> None:
    token = "tok_HIDDEN_IN_A_BROKEN_BODY_77"
    for raw in ('{"access_token": {"value": "' + token + '"}, oops',
                '{"access\\u005ftoken": "' + token + '", oops'):
        body, headers = signed(raw)
        assert (await client.post("/webhooks", data=body, headers=headers)).status == 200
    rows = await stored(db_url)
    assert len(rows) == 2
    for row in rows:
        assert token.encode() not in bytes(row["body"])
        assert bytes(row["body"]).startswith(b"[body withheld")
