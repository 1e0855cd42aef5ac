"""The history explorer over HTTP (the README's "History explorer"): the page at ``/ui/`` and
the JSON it reads (routes, and the bearer token on the JSON: app.py).

- ``GET /ui/`` and ``GET /ui/{asset}``: the static files shipped in ``mirror/static/`` (a fixed
  list read once, so no request names a file on disk). They hold no data and need no token;
  the page asks for the token once per browser session and sends it as a bearer header.
- ``GET /explore/resources``, ``/explore/search``, ``/explore/timeline``, ``/explore/state``,
  ``/explore/overview``: bearer-protected like the rest of the read API. Ids travel as query
  parameters, so every id (one with ``/`` in it too) is asked for the same way. Errors are
  raised and answered by mirror.middleware.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from mirror import explore, params
from mirror.db import guarded
from mirror.errors import BadRequest, NotFound
from mirror.keys import POOL, SETTINGS
from mirror.middleware import json_answer
from projections import registry

ASSET_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Everything the page needs comes from this origin; nothing is framed, nothing inline.
_PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_TEXT = 512        # longest id, search text or connection id accepted, in characters

Handler = Callable[[web.Request], Awaitable[web.Response]]


def load_assets(directory: Path = ASSET_DIR) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) for every servable file in ``directory``."""
    assets = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in _TYPES:
            assets[path.name] = (path.read_bytes(), _TYPES[path.suffix])
    if "index.html" not in assets:
        raise RuntimeError(f"the explorer's index.html is missing from {directory}")
    return assets


@functools.cache
def assets() -> dict[str, tuple[bytes, str]]:
    """The shipped assets, read once (the app factory reads them at start)."""
    return load_assets()


async def page(request: web.Request) -> web.Response:
    """GET /ui/ and /ui/{asset}: the explorer's page and its files."""
    name = request.match_info.get("asset") or "index.html"
    found = assets().get(name)
    if found is None:
        raise NotFound("no such file")
    body, content_type = found
    return web.Response(body=body, headers={**_PAGE_HEADERS, "Content-Type": content_type})


async def to_page(request: web.Request) -> web.Response:
    """GET /ui: to /ui/."""
    raise web.HTTPMovedPermanently("/ui/")


def _text(request: web.Request, name: str, *, required: bool = False) -> str | None:
    value = request.query.get(name, "")
    if value == "":
        if required:
            raise BadRequest(f"{name} is required")
        return None
    return params.text(value, name, MAX_TEXT)


def _resource(request: web.Request, *, required: bool) -> str | None:
    raw = _text(request, "resource", required=required)
    return None if raw is None else params.resource(raw)


def _limit(request: web.Request, default: int, maximum: int) -> int:
    return params.limit(request.query.get("limit"), default, maximum)


def _reading(read: Callable[[web.Request, asyncpg.Connection], Awaitable[Any]]) -> Handler:
    """A handler: ``read(request, conn)`` on a pooled connection, its result as JSON; None
    means 404."""

    async def handler(request: web.Request) -> web.Response:
        async def run() -> Any:
            settings = request.app[SETTINGS]
            async with request.app[POOL].acquire(timeout=settings.db_timeout) as conn:
                return await read(request, conn)

        body = await guarded(run)
        if body is None:
            raise NotFound("no such object, or no state at that time")
        return json_answer(body, headers={"Cache-Control": "no-store"})

    handler.__doc__ = read.__doc__
    return handler


@_reading
async def resources(request: web.Request, conn: asyncpg.Connection) -> Any:
    """The resources that can be searched and opened."""
    return {"resources": [r.name for r in registry.resources()]}


@_reading
async def search(request: web.Request, conn: asyncpg.Connection) -> Any:
    """Objects by id prefix, order number or SKU, optionally in one resource."""
    text = _text(request, "q", required=True)
    assert text is not None
    resource = _resource(request, required=False)
    limit = _limit(request, explore.SEARCH_LIMIT, 100)
    return {"q": text, "results": await explore.search(conn, text, resource, limit)}


@_reading
async def timeline(request: web.Request, conn: asyncpg.Connection) -> Any:
    """One page of an object's versions with their changes, and its anomalies."""
    resource = _resource(request, required=True)
    object_id = _text(request, "id", required=True)
    assert resource is not None and object_id is not None
    return await explore.timeline(conn, resource, object_id, _text(request, "connection_id"),
                                  params.time(request.query.get("before"), "before"),
                                  _limit(request, explore.PAGE_DEFAULT, explore.PAGE_MAX))


@_reading
async def state(request: web.Request, conn: asyncpg.Connection) -> Any:
    """The object's state at ``at`` as known at ``known_at``."""
    resource = _resource(request, required=True)
    object_id = _text(request, "id", required=True)
    assert resource is not None and object_id is not None
    at = params.time(request.query.get("at"), "at")
    known_at = params.time(request.query.get("known_at"), "known_at")
    found, data = await explore.state(conn, resource, object_id, at, known_at,
                                      _text(request, "connection_id"))
    if data is None:
        return None
    return {"resource": resource, "id": object_id, "connection_id": found,
            "at": at.isoformat() if at else None,
            "known_at": known_at.isoformat() if known_at else None, "data": data}


@_reading
async def overview(request: web.Request, conn: asyncpg.Connection) -> Any:
    """The overview page's figures."""
    return await explore.overview(conn)
