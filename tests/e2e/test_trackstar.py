"""The Trackstar REST side through the running service (`python -m mirror serve`), against the
fake Trackstar API on loopback: truncated deliveries completed by the service itself,
reconcile deleting what the API no longer lists, and every id readable over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest
from yarl import URL

from tests.conftest import API_TOKEN
from tests.e2e.harness import Service, fetch, wait_projected
from tests.fake_trackstar import FakeTrackstar
from tests.signing import envelope, signed

API_KEY = "tsk_E2E_API_KEY_never_logged_77"
TOKEN = "tok_E2E_ACCESS_never_logged_55"
CONN = "conn_e2e"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTrackstar]:
    api = FakeTrackstar(api_key=API_KEY, tokens={TOKEN: CONN})
    await api.start()
    yield api
    await api.close()


def keyed(fake: FakeTrackstar) -> dict[str, str]:
    return {"MIRROR_TRACKSTAR_API_KEY": API_KEY, "MIRROR_TRACKSTAR_BASE_URL": fake.url}


async def start(start_service: Callable[..., Service], **kwargs: Any) -> Service:
    # In a thread: the fake API answers from this test's event loop meanwhile.
    return await asyncio.to_thread(start_service, **kwargs)


async def post(session: aiohttp.ClientSession, service: Service, event: dict[str, Any]) -> str:
    body, headers = signed(event)
    async with session.post(service.url + "/webhooks", data=body, headers=headers) as resp:
        assert resp.status in {200, 202, 204}, await resp.text()
    return headers["svix-id"]


def order(order_id: str, minute: int, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": order_id, "status": status, "order_number": f"SO-{order_id}",
            "created_date": "2025-05-01T10:00:00Z", "updated_date": f"2025-05-01T10:{minute:02d}:00Z",
            "line_items": [{"sku": "A", "quantity": 1}], "shipments": [], **extra}


def truncated(fake: FakeTrackstar, order_id: str, full: dict[str, Any],
              key: str | None = None) -> dict[str, Any]:
    """A truncated order.updated stub whose data_url answers the full event."""
    key = key or order_id
    stub = envelope("order.updated", {"id": order_id}, connection_id=CONN,
                    previous={"status": "open", "updated_date": "2025-05-01T10:00:00Z"},
                    data_truncated=True, data_url=fake.data_url(key))
    fake.events[key] = {**stub, "data": full, "data_truncated": False}
    return stub


async def wait_for(db_url: str, sql: str, expected: Any, *args: Any,
                   timeout: float = 30.0) -> float:
    """Poll until ``sql`` returns ``expected``; the seconds it took."""
    started = time.monotonic()
    conn = await asyncpg.connect(db_url)
    try:
        while True:
            value = await conn.fetchval(sql, *args)
            if value == expected:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{sql!r} is {value!r}, not {expected!r} after {timeout} s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def status_text(db_url: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "status",
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
             "DATABASE_URL": db_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def gauges(session: aiohttp.ClientSession, service: Service) -> dict[str, float]:
    async with session.get(service.url + "/metrics") as resp:
        text = await resp.text()
    found = re.findall(r'^mirror_truncated_deliveries\{state="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {state: float(n) for state, n in found}


COMPLETED = "SELECT count(*) FROM mirror.completions WHERE state = 'completed'"
FETCHED = "SELECT count(*) FROM mirror.events WHERE origin = 'fetch'"


# ---------------------------------------------------------------------------------------------
# Completion of truncated deliveries
# ---------------------------------------------------------------------------------------------
async def test_the_service_completes_a_truncated_delivery_within_seconds(
        fake: FakeTrackstar, start_service: Callable[..., Service], db_url: str) -> None:
    elsewhere = FakeTrackstar(api_key=API_KEY, tokens={})
    await elsewhere.start()
    try:
        service = await start(start_service, env=keyed(fake))
        full = order("ord_big", 30, "picked", notes="x" * 5000)
        async with aiohttp.ClientSession() as session:
            await post(session, service, envelope("order.created", order("ord_big", 0, "open"),
                                                  connection_id=CONN))
            stub_id = await post(session, service, truncated(fake, "ord_big", full))
            took = await wait_for(db_url, "SELECT status FROM mirror.orders WHERE id = 'ord_big'",
                                  "picked", timeout=5.0)
            # One whose data_url is on another host: the API key must not travel there.
            foreign = envelope("order.updated", {"id": "ord_far"}, connection_id=CONN,
                               data_truncated=True, data_url=elsewhere.data_url("far"))
            await post(session, service, foreign)
            await wait_for(db_url, "SELECT count(*) FROM mirror.completions "
                                   "WHERE state = 'failed'", 1, timeout=10.0)
            metrics = await gauges(session, service)
    finally:
        await elsewhere.close()

    assert took < 5.0
    rows = await fetch(db_url, "SELECT event_id, data::text AS data FROM mirror.events "
                               "WHERE origin = 'fetch'")
    assert [(r["event_id"], json.loads(r["data"])) for r in rows] == [("fetch_" + stub_id, full)]
    served = fake.served("/webhooks/events/")
    assert len(served) == 1 and served[0].api_key_sent
    assert elsewhere.requests == []                     # nothing at all went to the other host
    failed = await fetch(db_url, "SELECT reason FROM mirror.completions WHERE state = 'failed'")
    assert "not on the Trackstar API host" in failed[0]["reason"]
    assert metrics == {"pending": 0.0, "completed": 1.0, "failed": 1.0}
    text = await status_text(db_url)
    assert "truncated deliveries: 0 pending, 1 completed, 1 failed" in text
    assert "not on the Trackstar API host" in text
    assert API_KEY not in service.logs() + service.output() + text


async def test_a_delivery_received_before_the_key_is_completed_after_a_restart_with_it(
        fake: FakeTrackstar, start_service: Callable[..., Service], db_url: str) -> None:
    service = await start(start_service)
    full = order("ord_early", 20, "packed")
    async with aiohttp.ClientSession() as session:
        await post(session, service, envelope("order.created", order("ord_early", 0, "open"),
                                              connection_id=CONN))
        await post(session, service, truncated(fake, "ord_early", full))
        await wait_projected(db_url)
        await asyncio.sleep(1.0)   # a worker, if one ran, would have completed it by now
        assert await gauges(session, service) == {"pending": 1.0, "completed": 0.0,
                                                  "failed": 0.0}
    assert "truncated deliveries: 1 pending, 0 completed, 0 failed" in await status_text(db_url)
    assert fake.requests == []
    assert (await fetch(db_url, "SELECT status FROM mirror.orders"))[0]["status"] == "open"

    await asyncio.to_thread(service.stop)
    service.env.update(keyed(fake))
    started = time.monotonic()
    await asyncio.to_thread(service.start)
    await wait_for(db_url, "SELECT status FROM mirror.orders WHERE id = 'ord_early'", "packed",
                   timeout=15.0)
    assert time.monotonic() - started < 15.0
    assert await wait_for(db_url, COMPLETED, 1) >= 0
    assert "truncated deliveries: 0 pending, 1 completed, 0 failed" in await status_text(db_url)


async def test_two_instances_complete_each_delivery_once(
        fake: FakeTrackstar, start_service: Callable[..., Service], db_url: str) -> None:
    fake.data_delay = 0.3      # long enough for both instances to see every stub pending
    first = await start(start_service, env=keyed(fake))
    second = await start(start_service, env=keyed(fake))
    count = 24
    async with aiohttp.ClientSession() as session:
        posts = []
        for i in range(count):
            oid = f"ord_{i:02d}"
            stub = truncated(fake, oid, order(oid, 10, "picked"))
            posts.append(post(session, first if i % 2 else second, stub))
        await asyncio.gather(*posts)
    await wait_for(db_url, COMPLETED, count, timeout=60.0)
    await wait_for(db_url, FETCHED, count)
    asked = [r.path for r in fake.served("/webhooks/events/")]
    assert sorted(asked) == sorted(set(asked)) and len(asked) == count   # each fetched once
    leases = await fetch(db_url, "SELECT count(*) FROM mirror.completions "
                                 "WHERE lease_owner IS NOT NULL")
    assert leases[0]["count"] == 0                                       # none left behind


async def test_rate_limited_and_failing_data_urls_are_retried_politely(
        fake: FakeTrackstar, start_service: Callable[..., Service], db_url: str) -> None:
    fake.data_rate_limit, fake.window, fake.retry_after = 2, 1.0, "1"
    fake.data_inject = [503, 502]         # the first two answers are server errors
    service = await start(start_service, env=keyed(fake))
    count = 6
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            oid = f"ord_r{i}"
            await post(session, service, truncated(fake, oid, order(oid, 12, "picked")))
    await wait_for(db_url, COMPLETED, count, timeout=60.0)
    served = fake.served("/webhooks/events/")
    statuses = [r.status for r in served]
    assert 429 in statuses and 503 in statuses and 502 in statuses
    assert statuses.count(200) == count
    # After a 429 asking for 1 s, no request came before that second was over (but for one
    # already on its way when the 429 was answered).
    for i, r in enumerate(served):
        if r.status == 429:
            gaps = [s.at - r.at for s in served[i + 1:] if s.at - r.at > 0.05]
            assert not gaps or min(gaps) >= 0.9, (i, gaps)
    assert (await fetch(db_url, FETCHED))[0]["count"] == count


async def test_a_data_url_that_answers_404_is_given_up_with_its_reason(
        fake: FakeTrackstar, start_service: Callable[..., Service], db_url: str) -> None:
    service = await start(start_service, env=keyed(fake))
    stub = envelope("order.updated", {"id": "ord_gone"}, connection_id=CONN,
                    data_truncated=True, data_url=fake.data_url("expired"))
    async with aiohttp.ClientSession() as session:
        await post(session, service, stub)
        await wait_for(db_url, "SELECT count(*) FROM mirror.completions WHERE state = 'failed'",
                       1, timeout=10.0)
        await asyncio.sleep(1.0)   # no retry follows
        assert (await gauges(session, service))["failed"] == 1.0
    assert [r.status for r in fake.served("/webhooks/events/")] == [404]
    reason = (await fetch(db_url, "SELECT reason FROM mirror.completions"))[0]["reason"]
    assert "data_url is gone" in reason and "404" in reason
    text = await status_text(db_url)
    assert "0 pending, 0 completed, 1 failed" in text and "data_url is gone" in text
    assert (await fetch(db_url, FETCHED))[0]["count"] == 0


# ---------------------------------------------------------------------------------------------
# Reconcile: deletions only after a complete listing
# ---------------------------------------------------------------------------------------------
async def run_cli(db_url: str, fake: FakeTrackstar, *args: str) -> tuple[int, str, str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")},
           "DATABASE_URL": db_url, "MIRROR_TRACKSTAR_API_KEY": API_KEY,
           "MIRROR_TRACKSTAR_BASE_URL": fake.url, "MIRROR_TRACKSTAR_ACCESS_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def read(session: aiohttp.ClientSession, service: Service, path: str) -> tuple[int, Any]:
    async with session.get(URL(service.url + path, encoded=True),
                           headers={"Authorization": f"Bearer {API_TOKEN}"}) as resp:
        return resp.status, await resp.json()


async def test_reconcile_repair_deletes_only_after_a_complete_listing(
        fake: FakeTrackstar, start_service: Callable[..., Service], db_url: str) -> None:
    service = await start(start_service)
    for i in range(25):
        fake.put(CONN, "/wms/orders", order(f"ord_{i:02d}", 5, "open"))
    code, out, err = await run_cli(db_url, fake, "backfill", "--connection-id", CONN,
                                   "--resource", "order", "--page-size", "10")
    assert code == 0, out + err
    await wait_projected(db_url)
    fake.remove(CONN, "/wms/orders", "ord_07")
    fake.remove(CONN, "/wms/orders", "ord_21")

    fake.broken_from = 20          # the third page answers 503, every time
    code, out, _ = await run_cli(db_url, fake, "reconcile", "--connection-id", CONN,
                                 "--resource", "order", "--repair", "--page-size", "10")
    assert code == 1
    assert "order: FAILED: the listing failed, nothing compared or repaired" in out
    assert "503" in out
    await wait_projected(db_url)
    async with aiohttp.ClientSession() as session:
        assert (await read(session, service, "/objects/order/ord_07"))[0] == 200

        fake.broken_from = None
        code, out, err = await run_cli(db_url, fake, "reconcile", "--connection-id", CONN,
                                       "--resource", "order", "--repair", "--page-size", "10")
        assert code == 0, out + err
        assert "2 drifted (2 missing there)" in out and "[deleted]" in out
        await wait_projected(db_url)
        status, body = await read(session, service, "/objects/order/ord_07")
        assert status == 404, body
        status, body = await read(session, service, "/objects/order/ord_07/history")
        assert status == 200
        assert [v["event_type"] for v in body["versions"]] == ["order.updated", "order.deleted"]
        assert body["versions"][-1]["data"] is None
        assert (await read(session, service, "/objects/order/ord_08"))[0] == 200
    drift = await fetch(db_url, "SELECT object_id FROM mirror.anomalies WHERE kind = 'drift' "
                                "AND resolved_at IS NOT NULL ORDER BY 1")
    assert [r["object_id"] for r in drift] == ["ord_07", "ord_21"]


# ---------------------------------------------------------------------------------------------
# Every id readable over HTTP
# ---------------------------------------------------------------------------------------------
STRANGE_IDS = [
    "https://wms.example.com/v2/orders?page=2&limit=50#frag",
    "a/b/c", "a/history", "what?", "100%", "%2F", "hash#tag", "with space", "  padded ",
    "Ünïcødé-订单-🚚", "a+b", "..", "semi;colon", "tab\tin",
]


async def test_ids_with_reserved_and_non_ascii_characters_are_readable(
        start_service: Callable[..., Service], db_url: str) -> None:
    service = await start(start_service)
    async with aiohttp.ClientSession() as session:
        for i, object_id in enumerate(STRANGE_IDS):
            await post(session, service, envelope("order.created", order(object_id, i, "open")))
            await post(session, service, envelope("connection-error.created", {
                "failed_url": object_id, "error_message": "boom",
                "created_date": "2025-05-01T10:00:00Z", "updated_date": "2025-05-01T10:00:00Z"}))
        await wait_projected(db_url)
        for object_id in STRANGE_IDS:
            encoded = quote(object_id, safe="")
            for resource in ("order", "connection-error"):
                status, body = await read(session, service, f"/objects/{resource}/{encoded}")
                assert status == 200, (resource, object_id, body)
                assert body["id"] == object_id
                key = "id" if resource == "order" else "failed_url"
                assert body["data"][key] == object_id
                status, body = await read(session, service,
                                          f"/objects/{resource}/{encoded}/history")
                assert status == 200, (resource, object_id, body)
                assert body["id"] == object_id and len(body["versions"]) == 1
        # An unencoded slash reaches the id too; what is not there is a 404, never a 5xx.
        status, body = await read(session, service, "/objects/order/a/b/c")
        assert status == 200 and body["id"] == "a/b/c"
        for path in ("/objects/order/%FF%FE", "/objects/order/%00", "/objects/order/nope%2F",
                     "/objects/order/%E2%82", "/objects/order/x/history/history"):
            status, _ = await read(session, service, path)
            assert status in {400, 404}, path
