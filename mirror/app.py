"""The aiohttp application factory: every route, the middlewares, and the pool, appender and
workers as contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from mirror import ingress, middleware, ops, read_api, ui
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

Handler = Callable[[web.Request], Awaitable[web.Response]]

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
    app = web.Application(client_max_size=settings.max_body_bytes + 1,
                          middlewares=[middleware.errors, middleware.bearer_auth])
    app[SETTINGS] = settings
    app[VERIFIER] = Verifier(settings.webhook_secrets)
    app[METRICS] = Metrics(multiprocess=settings.metrics_dir is not None)

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
        trackstar_api = ApiSettings.for_service(settings) if complete else None
        completer = None
        if trackstar_api is not None:
            completer = CompletionWorker(pool, trackstar_api, metrics=app[METRICS])
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
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    """Every route of the service; the read API and the explorer's JSON need the bearer token.

    An object id is percent-encoded in the path (a connection error's id is a URL). aiohttp
    routes on the path with ``%2F`` (and ``%25``) still encoded and decodes each matched part
    once, so ``/objects/connection-error/https%3A%2F%2Fwms%2Fa%3Fb/history`` is the history of
    ``https://wms/a?b``. ``{id:.+}`` also takes an id whose ``/`` a client did not encode; the
    history route is tried first, so such an id must not end in ``/history``.
    """
    ui.assets()  # read the explorer's files now: a broken install fails at start
    open_, token = False, True
    routes: list[tuple[str, str, Handler, bool]] = [
        ("POST", "/webhooks", ingress.webhook, open_),
        ("*", "/webhooks", ingress.wrong_method, open_),
        ("GET", "/healthz", ops.healthz, open_),
        ("GET", "/readyz", ops.readyz, open_),
        ("GET", "/metrics", ops.metrics_endpoint, open_),
        ("GET", "/objects/{resource}/{id:.+}/history", read_api.get_history, token),
        ("GET", "/objects/{resource}/{id:.+}", read_api.get_object, token),
        ("GET", "/ui", ui.to_page, open_),
        ("GET", "/ui/", ui.page, open_),
        ("GET", "/ui/{asset}", ui.page, open_),
        ("GET", "/explore/resources", ui.resources, token),
        ("GET", "/explore/search", ui.search, token),
        ("GET", "/explore/timeline", ui.timeline, token),
        ("GET", "/explore/state", ui.state, token),
        ("GET", "/explore/overview", ui.overview, token),
    ]
    protected: set[web.AbstractResource] = set()
    for method, path, handler, needs_token in routes:
        route = _add(app, method, path, handler)
        # By resource (the path, every method), so HEAD, added beside every GET, needs it too.
        if needs_token and route.resource is not None:
            protected.add(route.resource)
    app[middleware.TOKEN_RESOURCES] = protected


def _add(app: web.Application, method: str, path: str, handler: Handler) -> web.AbstractRoute:
    if method == "GET":  # and HEAD
        return app.router.add_get(path, handler, expect_handler=middleware.expect_handler)
    return app.router.add_route(method, path, handler, expect_handler=middleware.expect_handler)
