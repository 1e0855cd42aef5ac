"""The naive baseline: how most people would write it. aiohttp + svix, and per request one
transaction that INSERTs the event and upserts the current row.

Run: python -m bench.naive PORT DSN SECRET
"""

from __future__ import annotations

import json
import sys

import asyncpg
from aiohttp import web
from svix.webhooks import Webhook, WebhookVerificationError

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS naive;
CREATE TABLE IF NOT EXISTS naive.events (
    id bigserial PRIMARY KEY, event_id text UNIQUE, event_type text, body jsonb,
    received_at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS naive.current (
    resource text, id text, data jsonb, updated_at timestamptz DEFAULT now(),
    PRIMARY KEY (resource, id));
"""


def make_app(dsn: str, secret: str) -> web.Application:
    hook = Webhook(secret)
    pool_key = web.AppKey("pool", asyncpg.Pool)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            hook.verify(body, dict(request.headers))
        except (WebhookVerificationError, ValueError):
            return web.json_response({"error": "bad signature"}, status=401)
        event = json.loads(body)
        data = event.get("data") or {}
        async with request.app[pool_key].acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO naive.events (event_id, event_type, body) VALUES ($1, $2, $3) "
                "ON CONFLICT (event_id) DO NOTHING",
                request.headers["svix-id"], event.get("event_type"), body.decode())
            await conn.execute(
                "INSERT INTO naive.current (resource, id, data) VALUES ($1, $2, $3) "
                "ON CONFLICT (resource, id) DO UPDATE SET data = EXCLUDED.data, "
                "updated_at = now()",
                str(event.get("event_type", "")).split(".")[0], str(data.get("id")),
                json.dumps(data))
        return web.json_response({"status": "stored"})

    async def pool_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[pool_key] = await asyncpg.create_pool(dsn, min_size=4, max_size=20)
        async with app[pool_key].acquire() as conn:
            await conn.execute(SCHEMA)
        yield
        await app[pool_key].close()

    app = web.Application()
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/webhooks", handle)
    return app


if __name__ == "__main__":
    port, dsn, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    web.run_app(make_app(dsn, secret), host="127.0.0.1", port=port, print=None,
                access_log=None)
