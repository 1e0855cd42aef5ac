"""The read API: GET /objects/{resource}/{id}[/history], bearer-token protected.

Reads go to the read replica (MIRROR_READ_DATABASE_URL) when one answers, else the primary.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from mirror import history
from mirror.errors import AmbiguousObject, BadRequest, DatabaseUnavailable
from mirror.ingress import expect_handler, json_answer, reason
from mirror.keys import READER, SETTINGS
from projections import registry
from projections.base import parse_time

_FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)


def _authorised(request: web.Request) -> bool:
    expected = request.app[SETTINGS].api_token
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    # Constant time: the comparison does not reveal how much of the token matched, nor its
    # length. Header bytes that are not UTF-8 arrive as surrogates: compare them as they came.
    given = token.strip().encode("utf-8", errors="surrogateescape")
    return hmac.compare_digest(given, expected.encode())


def _text_parameter(value: str, name: str) -> str:
    """``value`` if the database can take it as text; BadRequest otherwise."""
    if not value or len(value) > 2048 or "\x00" in value:
        raise BadRequest(f"bad {name}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"bad {name}") from None
    return value


def _time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    parsed = parse_time(raw)
    if parsed is None:
        raise BadRequest(f"{name} must be an ISO 8601 time, got {raw[:64]!r}")
    return parsed


def _target(request: web.Request) -> tuple[str, str]:
    resource = registry.by_name(request.match_info["resource"])
    if resource is None:
        raise BadRequest(f"unknown resource {request.match_info['resource'][:64]!r}")
    return resource.name, _text_parameter(request.match_info["id"], "object id")


def _connection(request: web.Request) -> str | None:
    raw = request.query.get("connection_id")
    return _text_parameter(raw, "connection_id") if raw else None


async def get_object(request: web.Request) -> web.Response:
    """The object's state at ``at`` (default: now, i.e. its current state)."""
    if not _authorised(request):
        return reason(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
    try:
        resource, object_id = _target(request)
        at = _time(request, "at")
        known_at = _time(request, "known_at")
        connection_id = _connection(request)

        async def read(conn: asyncpg.Connection) -> tuple[str | None, Any]:
            return await history.object_as_of(conn, resource, object_id, at or _FAR_FUTURE,
                                              connection_id, known_at)

        found_connection, data = await request.app[READER].run(read)
    except (BadRequest, AmbiguousObject) as exc:
        return reason(400, str(exc))
    except DatabaseUnavailable:
        return reason(503, "database unavailable", **{"Retry-After": "5"})
    if data is None:
        return reason(404, "no state for that object at that time")
    return json_answer({
        "resource": resource, "id": object_id, "connection_id": found_connection,
        "at": at.isoformat() if at else None,
        "known_at": known_at.isoformat() if known_at else None,
        "data": data,
    })


async def get_history(request: web.Request) -> web.Response:
    """Every version of the object."""
    if not _authorised(request):
        return reason(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
    try:
        resource, object_id = _target(request)
        connection_id = _connection(request)

        async def read(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            return await history.object_history(conn, resource, object_id, connection_id)

        versions = await request.app[READER].run(read)
    except (BadRequest, AmbiguousObject) as exc:
        return reason(400, str(exc))
    except DatabaseUnavailable:
        return reason(503, "database unavailable", **{"Retry-After": "5"})
    if not versions:
        return reason(404, "no such object")
    return json_answer({"resource": resource, "id": object_id, "versions": versions})


def add_routes(app: web.Application) -> None:
    """Register the read API on ``app``.

    The id is percent-encoded in the path (a connection error's id is a URL). aiohttp routes
    on the path with ``%2F`` (and ``%25``) still encoded and decodes each matched part once,
    so ``/objects/connection-error/https%3A%2F%2Fwms%2Fa%3Fb/history`` is the history of
    ``https://wms/a?b``. ``{id:.+}`` also takes an id whose ``/`` a client did not encode;
    the history route is tried first, so such an id must not end in ``/history``.
    """
    app.router.add_get("/objects/{resource}/{id:.+}/history", get_history,
                       expect_handler=expect_handler)
    app.router.add_get("/objects/{resource}/{id:.+}", get_object,
                       expect_handler=expect_handler)
