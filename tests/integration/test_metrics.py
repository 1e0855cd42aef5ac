"""GET /metrics: valid Prometheus text, and every series a user would alert on is there and
moves with what happens: requests by outcome, verification failures by reason, duplicates,
append latency, log head, per-partition lag, anomalies, unprojectable events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from mirror.app import create_app
from mirror.db import init_connection
from mirror.progress import PARTITIONS
from tests.conftest import make_settings
from tests.logtools import project_all
from tests.signing import envelope, signed

Client = TestClient[Any, Any]


@pytest.fixture
async def ingress_only(db_url: str) -> AsyncIterator[Client]:
    """The app without projection workers: the test projects when it wants to."""
    app = create_app(make_settings(db_url, max_body_bytes=4096), project=False)
    async with TestServer(app, host="127.0.0.1") as server, TestClient(server) as client:
        yield client


async def scrape(client: Client) -> dict[str, float]:
    """Every sample, keyed ``name{label="value",...}``; parsing fails on anything that is not
    Prometheus text."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def moved(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def order(object_id: str, hour: int, previous_hour: int | None = None) -> dict[str, Any]:
    data = {"id": object_id, "status": f"s{hour}", "updated_date": f"2025-01-01T{hour:02d}:00:00Z"}
    if previous_hour is None:
        return envelope("order.created", data)
    return envelope("order.updated", data, previous={
        "status": f"s{previous_hour}", "updated_date": f"2025-01-01T{previous_hour:02d}:00:00Z"})


async def test_every_series_appears_and_moves(ingress_only: Client, db_url: str) -> None:
    client = ingress_only
    before = await scrape(client)
    for series in ("mirror_log_head_position", "mirror_projection_lag_seconds",
                   "mirror_visibility_horizon_seconds", "mirror_open_anomalies",
                   "mirror_unprojectable_events", "mirror_poisoned_objects",
                   "mirror_duplicate_deliveries_total", "mirror_append_seconds_count"):
        assert series in before, series
    assert before["mirror_log_head_position"] == 0

    async def post(event: dict[str, Any] | bytes, **kwargs: Any) -> int:
        body, headers = signed(event, **kwargs)
        return (await client.post("/webhooks", data=body, headers=headers)).status

    # Stored: o1 created at 10:00, then an update at 12:00 revealing a state at 11:00 that
    # no webhook brought (an anomaly); a duplicate; an unknown event type; refusals.
    assert await post(order("o1", 10)) == 200
    body, headers = signed(order("o1", 12, previous_hour=11))
    assert (await client.post("/webhooks", data=body, headers=headers)).status == 200
    assert (await client.post("/webhooks", data=body, headers=headers)).status == 200
    assert await post(envelope("inventory_ledger.created", {"id": "l1"})) == 200
    assert (await client.post("/webhooks", data=body)).status == 401
    assert await post(order("o2", 10), at=datetime.now(UTC) - timedelta(minutes=10)) == 401
    assert await post(order("o3", 10, ) | {"pad": "x" * 5000}) == 413
    assert (await client.get("/webhooks")).status == 405

    queued = await scrape(client)
    key = "mirror_webhook_requests_total{{outcome=\"{}\"}}".format
    assert moved(before, queued, key("stored")) == 2
    assert moved(before, queued, key("duplicate")) == 1
    assert moved(before, queued, key("stored_unusable")) == 1
    assert moved(before, queued, key("unauthorized")) == 2
    assert moved(before, queued, key("too_large")) == 1
    assert moved(before, queued, key("wrong_method")) == 1
    reason = 'mirror_verification_failures_total{{reason="{}"}}'.format
    assert moved(before, queued, reason(
        "missing svix-id, svix-timestamp or svix-signature header")) == 1
    assert moved(before, queued, reason("timestamp too old (more than 5 minutes)")) == 1
    assert moved(before, queued, "mirror_duplicate_deliveries_total") == 1
    assert moved(before, queued, "mirror_append_seconds_count") == 4
    assert queued["mirror_append_seconds_sum"] > before["mirror_append_seconds_sum"]
    conn = await asyncpg.connect(db_url)
    await init_connection(conn)
    try:
        head = await conn.fetchval("SELECT max(position) FROM mirror.events")
        assert queued["mirror_log_head_position"] == head
        assert queued["mirror_unprojectable_events"] == 1
        # Nothing is projected yet: the lag, per partition, is every stored event.
        lag = {k: v for k, v in queued.items() if k.startswith("mirror_projection_lag_events{")}
        assert len(lag) == PARTITIONS
        assert sum(lag.values()) == 3
        assert queued["mirror_projection_lag_seconds"] > 0
        assert queued["mirror_open_anomalies"] == 0

        await project_all(conn)
    finally:
        await conn.close()
    projected = await scrape(client)
    assert sum(v for k, v in projected.items()
               if k.startswith("mirror_projection_lag_events{")) == 0
    assert projected["mirror_projection_lag_seconds"] == 0
    assert projected["mirror_open_anomalies"] == 1  # the change at 11:00 nobody sent


async def test_metrics_answer_while_the_database_is_down(db_url: str) -> None:
    settings = make_settings("postgresql://postgres@127.0.0.1:1/nowhere", db_timeout=1.0)
    async with TestServer(create_app(settings, project=False), host="127.0.0.1") as server, \
            TestClient(server) as client:
        body, headers = signed(order("o1", 10))
        assert (await client.post("/webhooks", data=body, headers=headers)).status == 503
        samples = await scrape(client)
        assert samples['mirror_webhook_requests_total{outcome="unavailable"}'] == 1
