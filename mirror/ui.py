"""The history explorer over HTTP (CONTRACT §11): the page at ``/ui/`` and the JSON it reads.

- ``GET /ui/`` and ``GET /ui/{asset}``: the static files shipped in ``mirror/static/`` (a fixed
  list read once at start, so no request names a file on disk). They hold no data and need no
  token; the page asks for the token once per browser session and sends it as a bearer header.
- ``GET /explore/resources``, ``/explore/search``, ``/explore/timeline``, ``/explore/state``,
  ``/explore/overview``: bearer-protected like the rest of the read API. Ids travel as query
  parameters, so every id (one with ``/`` in it too) is asked for the same way.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from mirror import explore
from mirror.db import guarded
from mirror.errors import AmbiguousObject, BadRequest, DatabaseUnavailable
from mirror.ingress import expect_handler, json_answer, reason
from mirror.keys import POOL, SETTINGS
from projections import registry
from projections.base import parse_time

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


def authorised(request: web.Request) -> bool:
    """True when the request carries ``Authorization: Bearer <MIRROR_API_TOKEN>``."""
    expected = request.app[SETTINGS].api_token
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    # Constant time; header bytes that are not UTF-8 arrive as surrogates and compare as sent.
    given = token.strip().encode("utf-8", errors="surrogateescape")
    return hmac.compare_digest(given, expected.encode())


def _text(request: web.Request, name: str, *, required: bool = False) -> str | None:
    """A query parameter the database can take as text; BadRequest otherwise."""
    value = request.query.get(name, "")
    if value == "":
        if required:
            raise BadRequest(f"{name} is required")
        return None
    if len(value) > MAX_TEXT or "\x00" in value:
        raise BadRequest(f"bad {name}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"bad {name}") from None
    return value


def _resource(request: web.Request, *, required: bool) -> str | None:
    raw = _text(request, "resource", required=required)
    if raw is None:
        return None
    resource = registry.by_name(raw)
    if resource is None:
        raise BadRequest(f"unknown resource {raw[:64]!r}")
    return resource.name


def _time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name, "")
    if raw == "":
        return None
    parsed = parse_time(raw)
    if parsed is None:
        raise BadRequest(f"{name} must be an ISO 8601 time, got {raw[:64]!r}")
    return parsed


def _limit(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit", "")
    if raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= maximum:
        raise BadRequest(f"limit must be a whole number from 1 to {maximum}")
    return int(raw)


def _protected(read: Callable[[web.Request, Any], Awaitable[Any]]) -> Handler:
    """A handler: token check, parameters and database read by ``read(request, conn)``, and
    the answer; ``read`` returning None means 404."""

    async def handler(request: web.Request) -> web.Response:
        if not authorised(request):
            return reason(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})

        async def run() -> Any:
            settings = request.app[SETTINGS]
            async with request.app[POOL].acquire(timeout=settings.db_timeout) as conn:
                return await read(request, conn)

        try:
            body = await guarded(run)
        except (BadRequest, AmbiguousObject) as exc:
            return reason(400, str(exc))
        except DatabaseUnavailable:
            return reason(503, "database unavailable", **{"Retry-After": "5"})
        if body is None:
            return reason(404, "no such object, or no state at that time")
        return json_answer(body, headers={"Cache-Control": "no-store"})

    handler.__doc__ = read.__doc__
    return handler


async def _resources(request: web.Request, conn: Any) -> Any:
    """The resources that can be searched and opened."""
    return {"resources": [r.name for r in registry.resources()]}


async def _search(request: web.Request, conn: Any) -> Any:
    """Objects by id prefix, order number or SKU, optionally in one resource."""
    text = _text(request, "q", required=True)
    assert text is not None
    resource = _resource(request, required=False)
    limit = _limit(request, explore.SEARCH_LIMIT, 100)
    return {"q": text, "results": await explore.search(conn, text, resource, limit)}


async def _timeline(request: web.Request, conn: Any) -> Any:
    """One page of an object's versions with their changes, and its anomalies."""
    resource = _resource(request, required=True)
    object_id = _text(request, "id", required=True)
    assert resource is not None and object_id is not None
    return await explore.timeline(conn, resource, object_id, _text(request, "connection_id"),
                                  _time(request, "before"),
                                  _limit(request, explore.PAGE_DEFAULT, explore.PAGE_MAX))


async def _state(request: web.Request, conn: Any) -> Any:
    """The object's state at ``at`` as known at ``known_at``."""
    resource = _resource(request, required=True)
    object_id = _text(request, "id", required=True)
    assert resource is not None and object_id is not None
    at, known_at = _time(request, "at"), _time(request, "known_at")
    found, data = await explore.state(conn, resource, object_id, at, known_at,
                                      _text(request, "connection_id"))
    if data is None:
        return None
    return {"resource": resource, "id": object_id, "connection_id": found,
            "at": at.isoformat() if at else None,
            "known_at": known_at.isoformat() if known_at else None, "data": data}


async def _overview(request: web.Request, conn: Any) -> Any:
    """The overview page's figures."""
    return await explore.overview(conn)


def add_routes(app: web.Application) -> None:
    """Register the explorer's page and JSON endpoints on ``app``."""
    assets = load_assets()

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("asset") or "index.html"
        found = assets.get(name)
        if found is None:
            return reason(404, "no such file")
        body, content_type = found
        return web.Response(body=body, headers={**_PAGE_HEADERS, "Content-Type": content_type})

    async def to_page(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/ui/")

    for path, handler in (("/ui", to_page), ("/ui/", page), ("/ui/{asset}", page),
                          ("/explore/resources", _protected(_resources)),
                          ("/explore/search", _protected(_search)),
                          ("/explore/timeline", _protected(_timeline)),
                          ("/explore/state", _protected(_state)),
                          ("/explore/overview", _protected(_overview))):
        app.router.add_get(path, handler, expect_handler=expect_handler)
