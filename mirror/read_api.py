"""The read API: GET /objects/{resource}/{id}[/history] (routes and the bearer token: app.py).

Reads go to the read replica (MIRROR_READ_DATABASE_URL) when one answers, else the primary.
Errors are raised and answered by mirror.middleware (400, 404, 503).
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from mirror import history, params
from mirror.errors import NotFound
from mirror.keys import READER
from mirror.middleware import json_answer

MAX_TEXT = 2048  # longest id or connection id accepted, in characters


def _target(request: web.Request) -> tuple[str, str]:
    resource = params.resource(request.match_info["resource"])
    return resource, params.text(request.match_info["id"], "object id", MAX_TEXT)


def _connection(request: web.Request) -> str | None:
    raw = request.query.get("connection_id")
    return params.text(raw, "connection_id", MAX_TEXT) if raw else None


async def get_object(request: web.Request) -> web.Response:
    """The object's state at ``at`` (default: now, i.e. its current state)."""
    resource, object_id = _target(request)
    at = params.time(request.query.get("at"), "at")
    known_at = params.time(request.query.get("known_at"), "known_at")
    connection_id = _connection(request)

    async def read(conn: asyncpg.Connection) -> tuple[str | None, Any]:
        return await history.object_as_of(conn, resource, object_id, at,
                                          connection_id, known_at)

    found_connection, data = await request.app[READER].run(read)
    if data is None:
        raise NotFound("no state for that object at that time")
    return json_answer({
        "resource": resource, "id": object_id, "connection_id": found_connection,
        "at": at.isoformat() if at else None,
        "known_at": known_at.isoformat() if known_at else None,
        "data": data,
    })


async def get_history(request: web.Request) -> web.Response:
    """Every version of the object."""
    resource, object_id = _target(request)
    connection_id = _connection(request)

    async def read(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        return await history.object_history(conn, resource, object_id, connection_id)

    versions = await request.app[READER].run(read)
    if not versions:
        raise NotFound("no such object")
    return json_answer({"resource": resource, "id": object_id, "versions": versions})
