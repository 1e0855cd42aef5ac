"""The aiohttp application factory: routes, and the pool, appender and workers as contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from mirror import ingress, read_api, ui
from mirror.db import Reader, create_pool
from mirror.eventlog import Appender
from mirror.keys import (
    APPENDER,
    COMPLETION,
    METRICS,
    POOL,
    PROJECTOR,
    READER,
    SETTINGS,
    VERIFIER,
)
from mirror.metrics import Metrics
from mirror.projector import Projector
from mirror.settings import Settings
from mirror.supervise import ProjectorProcess
from mirror.trackstar.client import ApiSettings
from mirror.trackstar.completion import CompletionWorker
from mirror.verify import Verifier

# Svix sends a handful of short headers; anything near these limits is not a webhook.
MAX_LINE_SIZE = 8190      # request line and each header line, in bytes
MAX_FIELD_SIZE = 8190     # one header's value, in bytes
MAX_HEADERS = 64          # header lines per request
LINGERING_SECONDS = 2.0   # how long an unread body is drained after an early answer


def server_options(settings: Settings) -> dict[str, Any]:
    """The aiohttp server limits (``web.run_app``/``AppRunner`` keyword arguments).

    ``keepalive_timeout`` also bounds how long a connection may take to deliver a complete
    request head: aiohttp arms it when the connection opens and after every answer, and closes
    the connection if no full request has arrived by then (slowloris). Oversized request lines
    and headers are answered 400 by the parser before any handler runs.
    """
    return {
        "keepalive_timeout": float(settings.request_timeout),
        "max_line_size": MAX_LINE_SIZE,
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
        "lingering_time": LINGERING_SECONDS,
        # Svix signs the bytes it sends; a Content-Encoding would make the handler see other
        # bytes (and a small gzip body can inflate to gigabytes): bodies are taken as sent.
        "auto_decompress": False,
    }


def create_app(settings: Settings, *, project: bool = True,
               complete: bool = True) -> web.Application:
    """The service: webhook ingress, read API, operations endpoints and (optionally) the
    projection workers and, when a Trackstar API key is set, the completion of truncated
    deliveries, all sharing one pool (the read API reads from the read replica's pool when
    one is configured)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ingress.MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(ingress.MalformedRequestFilter())
    app = web.Application(client_max_size=settings.max_body_bytes + 1)
    app[SETTINGS] = settings
    app[VERIFIER] = Verifier(settings.webhook_secrets)
    app[METRICS] = Metrics()

    async def database(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, max_size=10, timeout=settings.db_timeout)
        app[POOL] = pool
        replica = None
        if settings.read_database_url:
            replica = await create_pool(settings.read_database_url, max_size=10,
                                        timeout=settings.db_timeout, read_only=True)
        app[READER] = Reader(pool, replica, timeout=settings.db_timeout)
        # A commit that takes longer than db_timeout is answered 503 (Svix retries; if it did
        # commit, the retry is a harmless duplicate), well within Svix's 15 s.
        app[APPENDER] = Appender(pool, timeout=settings.db_timeout)
        projector: Projector | ProjectorProcess | None = None
        if project and settings.projector == "process":
            projector = ProjectorProcess(settings.database_url, settings.workers,
                                         settings.batch_size)
            await projector.start()
            app[PROJECTOR] = projector
        elif project:
            projector = Projector(pool, settings.database_url, workers=settings.workers,
                                  batch_size=settings.batch_size,
                                  poll_interval=settings.poll_interval, metrics=app[METRICS])
            projector.start()
            app[PROJECTOR] = projector
        api = ApiSettings.for_service(settings) if complete else None
        completer = None
        if api is not None:
            completer = CompletionWorker(pool, api, metrics=app[METRICS])
            completer.start()
            app[COMPLETION] = completer
        yield
        if completer is not None:
            await completer.stop()
        await app[APPENDER].close()
        if projector is not None:
            await projector.stop()
        await app[READER].close()
        await pool.close()

    app.cleanup_ctx.append(database)
    expect = ingress.expect_handler
    app.router.add_post("/webhooks", ingress.webhook, expect_handler=expect)
    app.router.add_route("*", "/webhooks", ingress.wrong_method, expect_handler=expect)
    app.router.add_get("/healthz", ingress.healthz, expect_handler=expect)
    app.router.add_get("/readyz", ingress.readyz, expect_handler=expect)
    app.router.add_get("/metrics", ingress.metrics_endpoint, expect_handler=expect)
    read_api.add_routes(app)
    ui.add_routes(app)
    return app
