"""The webhook ingress: POST /webhooks, verified on the raw bytes, appended durably, answered.

Every outcome of a delivery is answered here, not by the error middleware (mirror/middleware.py),
because each one is counted in /metrics by outcome: 413 too large, 408 too slow, 400 unreadable,
401 not authentic, 503 database unavailable, 200 stored or duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mirror import parsing
from mirror.errors import DatabaseUnavailable, VerificationFailed
from mirror.eventlog import Record
from mirror.keys import APPENDER, METRICS, SETTINGS, VERIFIER
from mirror.middleware import json_answer, reason

log = logging.getLogger("mirror.ingress")


class LogBudget:
    """At most ``per_second`` log lines a second for one kind of line.

    A flood of forged or malformed requests must not become a flood of log lines (disk, CPU);
    /metrics counts every request, and the next line written says how many were left out.
    """

    def __init__(self, per_second: int = 10) -> None:
        self._per_second = per_second
        self._window = 0
        self._written = 0
        self._suppressed = 0

    def take(self) -> int | None:
        """None if this line must be left out; else how many were left out before it."""
        window = int(time.monotonic())
        if window != self._window:
            self._window, self._written = window, 0
        if self._written >= self._per_second:
            self._suppressed += 1
            return None
        self._written += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


_REFUSALS = LogBudget()


def log_refusal(why: str, peer: str | None) -> None:
    """Log one refused delivery, within the budget."""
    suppressed = _REFUSALS.take()
    if suppressed is None:
        return
    extra: dict[str, object] = {"reason": why, "peer": peer}
    if suppressed:
        extra["suppressed"] = suppressed
    log.info("delivery refused", extra=extra)


class MalformedRequestFilter(logging.Filter):
    """For aiohttp's ``aiohttp.server`` logger: a request the HTTP parser refuses (answered
    400 before any handler runs) becomes one short line, within a budget, instead of an error
    with a traceback that quotes the offending bytes (which may be anything a client sent,
    an Authorization header included)."""

    def __init__(self) -> None:
        super().__init__()
        self._budget = LogBudget()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        suppressed = self._budget.take()
        if suppressed is None:
            return False
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args, record.exc_info, record.exc_text = (
            "malformed HTTP request refused", (), None, None)
        record.status = exc.code
        if suppressed:
            record.suppressed = suppressed
        return True


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes | None:
    """The whole body, or None as soon as it exceeds ``limit`` bytes.

    Reads until the end of the body, however it is split in segments or chunks, and raises
    TimeoutError if it has not all arrived within ``timeout`` seconds (a slow client).
    """
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)


async def webhook(request: web.Request) -> web.Response:
    """POST /webhooks: verify on the raw bytes, append durably, then answer."""
    app = request.app
    metrics = app[METRICS]
    started = time.perf_counter()
    received_at = datetime.now(UTC)
    settings = app[SETTINGS]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        metrics.requests.labels("too_large").inc()
        return reason(413, f"body larger than {limit} bytes")
    try:
        body = await read_body(request, limit, settings.request_timeout)
    except TimeoutError:
        metrics.requests.labels("timeout").inc()
        slow = reason(408, f"body not received within {settings.request_timeout:g} s")
        slow.force_close()
        return slow
    except (asyncio.IncompleteReadError, ConnectionError, web.RequestPayloadError):
        metrics.requests.labels("aborted").inc()
        return reason(400, "body could not be read")
    if body is None:
        metrics.requests.labels("too_large").inc()
        return reason(413, f"body larger than {limit} bytes")
    try:
        delivery = app[VERIFIER].verify(body, request.headers)
    except VerificationFailed as exc:
        metrics.requests.labels("unauthorized").inc()
        metrics.verification_failures.labels(str(exc)).inc()
        log_refusal(str(exc), request.remote)
        return reason(401, str(exc))
    parsed = parsing.parse(body)
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
        return json_answer({"status": "duplicate", "event_id": delivery.message_id})
    metrics.requests.labels("stored" if parsed.unusable_reason is None else "stored_unusable").inc()
    answer: dict[str, str] = {"status": "stored", "event_id": delivery.message_id}
    if parsed.unusable_reason is not None:
        answer["warning"] = f"stored but not projectable: {parsed.unusable_reason}"
    return json_answer(answer)


async def wrong_method(request: web.Request) -> web.Response:
    """Anything but POST on /webhooks."""
    request.app[METRICS].requests.labels("wrong_method").inc()
    return reason(405, f"method {request.method} not allowed; use POST", Allow="POST")
