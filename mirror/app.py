"""The aiohttp application factory: routes, and the pool, appender and workers as contexts."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from mirror import api, ingress
from mirror.db import create_pool
from mirror.keys import APPENDER, METRICS, POOL, PROJECTOR, SETTINGS, VERIFIER
from mirror.log import Appender
from mirror.metrics import Metrics
from mirror.projector import Projector
from mirror.settings import Settings
from mirror.verify import Verifier


def create_app(settings: Settings, *, project: bool = True) -> web.Application:
    """The service: webhook ingress, read API, operations endpoints and (optionally) the
    projection workers, all sharing one pool."""
    app = web.Application(client_max_size=settings.max_body_bytes + 1)
    app[SETTINGS] = settings
    app[VERIFIER] = Verifier(settings.webhook_secrets)
    app[METRICS] = Metrics()

    async def database(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, max_size=10, timeout=settings.db_timeout)
        app[POOL] = pool
        app[APPENDER] = Appender(pool)
        projector = None
        if project:
            projector = Projector(pool, settings.database_url, workers=settings.workers,
                                  batch_size=settings.batch_size,
                                  poll_interval=settings.poll_interval, metrics=app[METRICS])
            projector.start()
            app[PROJECTOR] = projector
        yield
        await app[APPENDER].close()
        if projector is not None:
            await projector.stop()
        await pool.close()

    app.cleanup_ctx.append(database)
    app.router.add_post("/webhooks", ingress.webhook)
    app.router.add_route("*", "/webhooks", ingress.wrong_method)
    app.router.add_get("/healthz", ingress.healthz)
    app.router.add_get("/readyz", ingress.readyz)
    app.router.add_get("/metrics", ingress.metrics_endpoint)
    api.add_routes(app)
    return app
