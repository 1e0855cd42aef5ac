"""The operations endpoints: GET /healthz (alive), /readyz (ready, and why not), /metrics."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirror.db import explain, probe_hosts
from mirror.keys import METRICS, POOL, READER, SETTINGS
from mirror.middleware import json_answer
from mirror.progress import live_workers, projection_lag, refresh_gauges
from mirror.trackstar import completion

log = logging.getLogger("mirror.ops")


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive."""
    return json_answer({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: the database answers and the projection workers run; includes lag.

    When the primary cannot be reached it says why, host by host (during a failover: the old
    primary unreachable, the standby not yet promoted). The read replica's state and replay
    lag are shown but do not decide readiness: while it is unreachable, reads fall back to
    the primary.
    """
    app = request.app
    body: dict[str, object] = {}
    try:
        async with asyncio.timeout(2.0):
            async with app[POOL].acquire() as conn:
                # Workers anywhere (this service's projection process, or `mirror project`
                # elsewhere) report by heartbeat, so every ingress process answers alike.
                live = await live_workers(conn)
                body["lag"] = await projection_lag(conn)
    except Exception as exc:
        hosts = await probe_hosts(app[SETTINGS].database_url)
        body.update(status="not ready", database="unreachable", error=type(exc).__name__,
                    reason=explain(hosts), hosts=hosts)
        await _add_read_replica(app, body)
        return json_answer(body, status=503, headers={"Retry-After": "5"})
    body.update(status="ready" if live else "not ready", database="ok",
                workers=live)
    await _add_read_replica(app, body)
    return json_answer(body, status=200 if live else 503)


async def _add_read_replica(app: web.Application, body: dict[str, object]) -> None:
    replica = await app[READER].replica_status()
    body["read_replica"] = replica if replica is not None else {
        "status": "not configured", "reads": "primary"}


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    app = request.app
    try:
        # The gauges describe the database, so an ingress-only process serves them too.
        async with asyncio.timeout(2.0), app[POOL].acquire() as conn:
            await refresh_gauges(conn, app[METRICS])
            await completion.refresh_gauges(conn, app[METRICS])
    except Exception as exc:
        log.warning("metrics refresh failed", extra={"error": type(exc).__name__})
    payload = generate_latest(app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})
