"""HTTP answers: the webhook ingress and the operational endpoints.

This is the only module that maps mirror errors to HTTP status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirror import envelope
from mirror.errors import DatabaseUnavailable, VerificationFailed
from mirror.keys import APPENDER, METRICS, POOL, PROJECTOR, SETTINGS, VERIFIER
from mirror.log import Record

log = logging.getLogger("mirror.ingress")


def reason(status: int, text: str, **headers: str) -> web.Response:
    """A short JSON answer ``{"error": text}``."""
    return web.json_response({"error": text}, status=status, headers=headers or None)


async def webhook(request: web.Request) -> web.Response:
    """POST /webhooks: verify on the raw bytes, append durably, then answer."""
    app = request.app
    metrics = app[METRICS]
    started = time.perf_counter()
    received_at = datetime.now(UTC)
    limit = app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        metrics.requests.labels("too_large").inc()
        return reason(413, f"body larger than {limit} bytes")
    try:
        body = await request.content.read(limit + 1)
    except (asyncio.IncompleteReadError, ConnectionError):
        metrics.requests.labels("aborted").inc()
        return reason(400, "body could not be read")
    if len(body) > limit or not request.content.at_eof():
        metrics.requests.labels("too_large").inc()
        return reason(413, f"body larger than {limit} bytes")
    try:
        delivery = app[VERIFIER].verify(body, request.headers)
    except VerificationFailed as exc:
        metrics.requests.labels("unauthorized").inc()
        metrics.verification_failures.labels(str(exc)).inc()
        log.info("delivery refused", extra={"reason": str(exc), "peer": request.remote})
        return reason(401, str(exc))
    parsed = envelope.parse(body)
    record = Record(delivery.message_id, received_at, delivery.timestamp, "webhook", parsed)
    try:
        new = await app[APPENDER].append(record)
    except DatabaseUnavailable as exc:
        metrics.requests.labels("unavailable").inc()
        log.warning("append failed", extra={"event_id": delivery.message_id, "error": str(exc)})
        return reason(503, "database unavailable, retry later", **{"Retry-After": "5"})
    metrics.append_seconds.observe(time.perf_counter() - started)
    if not new:
        metrics.duplicates.inc()
        metrics.requests.labels("duplicate").inc()
        return web.json_response({"status": "duplicate", "event_id": delivery.message_id})
    metrics.requests.labels("stored" if parsed.unusable_reason is None else "stored_unusable").inc()
    answer: dict[str, str] = {"status": "stored", "event_id": delivery.message_id}
    if parsed.unusable_reason is not None:
        answer["warning"] = f"stored but not projectable: {parsed.unusable_reason}"
    return web.json_response(answer)


async def wrong_method(request: web.Request) -> web.Response:
    """Anything but POST on /webhooks."""
    request.app[METRICS].requests.labels("wrong_method").inc()
    return reason(405, f"method {request.method} not allowed; use POST", Allow="POST")


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: the database answers and the projection workers run; includes lag."""
    app = request.app
    projector = app.get(PROJECTOR)
    body: dict[str, object] = {}
    try:
        async with asyncio.timeout(2.0):
            async with app[POOL].acquire() as conn:
                await conn.fetchval("SELECT 1")
                if projector is not None:
                    body["lag"] = await projector.lag(conn)
    except Exception as exc:
        body.update(status="not ready", database="unreachable", error=type(exc).__name__)
        return web.json_response(body, status=503)
    workers = projector is not None and projector.running
    body.update(status="ready" if workers else "not ready", database="ok",
                workers="running" if workers else "stopped")
    return web.json_response(body, status=200 if workers else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    app = request.app
    projector = app.get(PROJECTOR)
    if projector is not None:
        try:
            async with asyncio.timeout(2.0), app[POOL].acquire() as conn:
                await projector.refresh_metrics(conn, app[METRICS])
        except Exception:
            log.warning("metrics refresh failed")
    payload = generate_latest(app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})
